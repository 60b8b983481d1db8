"""The checkpoint manager on a real DeepSpeed engine in this process (one rank, gloo): saving,
keeping the last K, finding the latest complete one, resuming, and the checks made before a
launch. Seconds, where the end-to-end resume tests take minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lsa_dist.checkpoint import CheckpointError, CheckpointManager, TrainState, read_meta, vet
from lsa_dist.config import flatten, load_config, to_yaml
from lsa_dist.dist import free_port
from lsa_dist.engine import Engine, build_engine
from lsa_dist.models import create_model, resize_pos_table
from lsa_dist.resume import (
    check_compatible,
    check_lineage,
    lineage_conflict,
    plan_resume,
    set_aside,
    take_lineage,
)
from lsa_dist.weights import export_fp32, init_model_from, save_model_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.options.widths=[16,16]", "model.options.heads=[2,2]", "model.options.depths=[1,1]"]


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo process group for this module; the environment is restored after it."""
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def make_engine(seed: int, backend: str = "deepspeed") -> Engine:
    overrides = [*TINY, f"engine.backend={backend}", "engine.zero_stage=1", "engine.precision=fp32"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, **{**cfg.model.options, "num_classes": 10})
    return build_engine(cfg, model, steps_per_epoch=10, world_size=1, device=torch.device("cpu"))


def train_one_step(engine) -> None:  # noqa: ANN001
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    engine.backward(torch.nn.functional.cross_entropy(engine.forward(images), labels))
    engine.step()


def test_saves_keep_the_last_k_and_latest_points_at_the_newest(process_group, tmp_path: Path) -> None:
    engine = make_engine(0)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2, rank=0)
    for step in range(1, 5):
        train_one_step(engine)
        folder = manager.save(engine, TrainState(step=step, batch=step, run_id="run-1", zero_stage=1), "model: {}\n")
        assert folder.name == f"step-{step:08d}"
    assert [p.name for p in manager.complete()] == ["step-00000003", "step-00000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000004"
    assert manager.latest() == tmp_path / "checkpoints" / "step-00000004"
    assert not list((tmp_path / "checkpoints").glob(".staging/step-*"))  # nothing half-written left
    meta = read_meta(manager.latest())
    assert meta["step"] == 4 and meta["world_size"] == 1 and meta["run_id"] == "run-1" and meta["zero_stage"] == 1
    assert (manager.latest() / "rng" / "rank0.pt").is_file() and (manager.latest() / "config.yaml").is_file()


@pytest.mark.parametrize("backend", ["deepspeed", "fairscale"])
def test_load_restores_weights_position_and_random_state(process_group, tmp_path: Path, backend: str) -> None:
    engine = make_engine(0, backend)
    assert isinstance(engine, Engine)  # the contract the trainer and the manager rely on
    train_one_step(engine)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3, rank=0)
    state = TrainState(epoch=2, batch=7, step=27, best_top1=41.5, backend=backend, zero_stage=1)
    folder = manager.save(engine, state, "", {"ema": {"x": 1}})
    after_save = torch.rand(4)  # the draws a resumed run must repeat
    saved = engine.full_state_dict()

    other = make_engine(1, backend)
    assert any(not torch.equal(saved[k], v) for k, v in other.full_state_dict().items())
    state, client_state = manager.load(other, folder)
    assert (state.epoch, state.batch, state.step, state.best_top1) == (2, 7, 27, 41.5)
    assert client_state["ema"] == {"x": 1}
    assert all(torch.equal(saved[k], v) for k, v in other.full_state_dict().items())
    assert torch.equal(torch.rand(4), after_save)
    exported, meta = export_fp32(folder)  # without DeepSpeed's engine: the plain model's weights
    assert meta["step"] == 27 and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_incomplete_and_staged_checkpoints_are_ignored_then_cleared(process_group, tmp_path: Path) -> None:
    engine = make_engine(0)
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=3, rank=0)
    manager.save(engine, TrainState(step=5), "")
    (root / "step-00000009").mkdir()  # a newer folder without meta.json: not complete
    (root / ".staging" / "step-00000010").mkdir(parents=True)  # a save cut short
    (root / "latest").write_text("step-00000009")
    assert manager.latest() == root / "step-00000005"
    manager.clean_staging()
    assert not (root / ".staging").exists()


def launch_config(tmp_path: Path, resume: str = "auto", *more: str):  # noqa: ANN201 - RunConfig
    overrides = [*TINY, f"train.output_dir={tmp_path}", "train.name=run", f"train.resume={resume}", *more]
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def test_the_resume_plan_before_a_launch(process_group, tmp_path: Path) -> None:
    """plan_resume, as the launchers' pre-flight and every rank compute it: what is continued,
    the lineage a launch leaves, and the fall-back over the run's own checkpoints whose
    meta.json, config.yaml or RNG files cannot be read; a named checkpoint is never replaced."""
    cfg = launch_config(tmp_path)
    run = cfg.run_dir
    assert plan_resume(cfg, 1).folder is None  # nothing to resume: a new run
    manager = CheckpointManager(run / "checkpoints", keep_last=5, rank=0)
    engine = make_engine(0)
    folders = [manager.save(engine, TrainState(step=s, run_id="abc"), to_yaml(cfg)) for s in (1, 2, 3, 4, 5)]
    plan = plan_resume(cfg, 2)  # continues its MLflow run, on any number of ranks
    assert (plan.folder, plan.run_id, plan.saved_world_size) == (folders[4], "abc", 1)
    assert plan.fallbacks == folders[3::-1] and plan.leave == [] and plan.passed_over == []
    with pytest.raises(CheckpointError, match=r"train.resume=never: .* holds this run's checkpoints \(up to step 5\)"):
        plan_resume(launch_config(tmp_path, "never"), 1)
    assert plan_resume(launch_config(tmp_path, "never", "train.overwrite=true"), 1).leave == folders
    named = plan_resume(launch_config(tmp_path, str(folders[2])), 1)  # a branch: a new MLflow run, no fall-back
    assert (named.folder, named.run_id, named.leave, named.fallbacks) == (folders[2], "", folders[3:], [])

    (folders[4] / "meta.json").write_text("{not json")
    (folders[3] / "config.yaml").write_text("model: [unclosed")
    (folders[2] / "config.yaml").unlink()
    (folders[1] / "rng" / "rank0.pt").unlink()
    plan = plan_resume(cfg, 1)
    assert plan.folder == folders[0] and plan.fallbacks == []
    reasons = [(folder, why.split(" (")[0]) for folder, why in plan.passed_over]
    assert reasons == [
        (folders[4], "meta.json is corrupt"),
        (folders[3], "config.yaml is corrupt"),
        (folders[2], "config.yaml is missing"),
        (folders[1], "rng/rank0.pt is missing"),
    ]
    with pytest.raises(CheckpointError) as err:  # named by train.resume: its fault is the error
        plan_resume(launch_config(tmp_path, str(folders[2])), 1)
    assert str(err.value) == f"cannot load checkpoint {folders[2]}: config.yaml is missing"
    said: list[str] = []
    take_lineage(plan, run, said.append)  # what the lock holder does before any worker starts
    assert manager.complete() == [folders[0]] and manager.latest() == folders[0]
    assert len(said) == 4 and all(line.startswith("warning: cannot use checkpoint") for line in said)
    why = next((run / "set_aside").glob("*/WHY.txt")).read_text()
    assert "step-00000005: meta.json is corrupt" in why and "step-00000002: rng/rank0.pt is missing" in why
    take_lineage(plan, run, said.append)  # a worker after its launcher: nothing left to move
    assert len(said) == 4 and len(list((run / "set_aside").iterdir())) == 1
    (folders[0] / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        read_meta(folders[0])
    assert plan_resume(cfg, 1).folder is None  # none readable: a new run


def test_a_rollback_starts_a_branch_and_an_overwrite_sets_everything_aside(process_group, tmp_path: Path) -> None:
    """Nothing of an earlier branch is deleted, adopted or left for `latest` to name."""
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", keep_last=3, rank=0)
    engine = make_engine(0)
    saved = [manager.save(engine, TrainState(step=step), "") for step in (2, 4, 6)]
    assert lineage_conflict(run, "auto") == ([], False)
    # a rollback to step 2 of this run: 4 and 6 go aside by themselves
    later, needs_overwrite = lineage_conflict(run, str(saved[0]))
    assert later == saved[1:] and not needs_overwrite
    check_lineage(run, str(saved[0]), overwrite=False)
    moved = set_aside(run, later)
    assert sorted(p.name for p in moved.iterdir()) == ["step-00000004", "step-00000006"]
    assert (moved / "step-00000006" / "meta.json").is_file()
    assert manager.latest() == saved[0] and (run / "checkpoints" / "latest").read_text() == "step-00000002"
    # the new branch saves step 4 afresh (not skipped because the old one existed) and keeps it
    new4 = manager.save(engine, TrainState(step=4, run_id="new"), "")
    assert read_meta(new4)["run_id"] == "new" and manager.latest() == new4
    # another run's checkpoint, or never: the whole lineage, and only with overwrite
    other = CheckpointManager(tmp_path / "other" / "checkpoints", 1, 0).save(engine, TrainState(step=9), "")
    everything, needs_overwrite = lineage_conflict(run, str(other))
    assert everything == [saved[0], new4] and needs_overwrite
    with pytest.raises(CheckpointError, match="train.overwrite=true"):
        check_lineage(run, str(other), overwrite=False)
    set_aside(run, everything)
    assert manager.complete() == [] and not (run / "checkpoints" / "latest").exists()
    assert len(list((run / "set_aside").rglob("meta.json"))) == 4  # 4, 6, then 2 and the new 4: all kept


def make_engine_with(*overrides: str) -> tuple[Engine, dict]:
    cfg = load_config(
        ROOT / "configs" / "demo.yaml", [*TINY, "engine.zero_stage=1", "engine.precision=fp32", *overrides]
    )
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **{**cfg.model.options, "num_classes": 10})
    return build_engine(cfg, model, steps_per_epoch=10, world_size=1, device=torch.device("cpu")), flatten(cfg)


def test_a_resume_that_changes_the_mathematics_is_refused_unless_accepted(process_group, tmp_path: Path) -> None:
    engine, flat = make_engine_with("optim.lr=1e-3")
    for _ in range(3):
        train_one_step(engine)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2, rank=0)
    folder = manager.save(engine, TrainState(step=3, dataset_sha256="a" * 64), to_yaml_of(flat))
    # logging, evaluation and workers may change freely
    free = {**flat, "tracking.log_every": 1, "train.eval_every": 5, "data.num_workers": 3, "data.root": "/elsewhere"}
    assert check_compatible(folder, free, "a" * 64, []) == []
    changed = {**flat, "optim.lr": 2e-3, "data.batch_size": 16}
    with pytest.raises(CheckpointError) as err:
        check_compatible(folder, changed, "b" * 64, ["data.batch_size"])
    message = str(err.value)
    assert (
        "\n" not in message
        and "optim.lr 0.001 -> 0.002" in message
        and "dataset 'aaaaaaaaaaaa' -> 'bbbbbbbbbbbb'" in message
    )
    assert "train.accept_changes=[optim.lr,dataset]" in message and "batch_size" not in message
    assert check_compatible(folder, changed, "a" * 64, ["optim", "data.batch_size"]) == ["data.batch_size", "optim.lr"]
    # accepted, the new peak lr takes over from the resumed step (the saved scheduler had 1e-3)
    resumed, _ = make_engine_with("optim.lr=2e-3")
    configured = resumed.base_lrs()
    manager.load(resumed, folder)
    assert resumed.lr() == pytest.approx(engine.lr())  # the checkpoint's schedule, as saved
    resumed.rebase_lr(configured)
    fresh, _ = make_engine_with("optim.lr=2e-3")  # what a run with the new lr has at this step
    for _ in range(3):
        train_one_step(fresh)
    assert resumed.lr() == pytest.approx(fresh.lr()) and fresh.lr() > 1.5 * engine.lr()
    train_one_step(resumed)
    train_one_step(fresh)
    assert resumed.lr() == pytest.approx(fresh.lr())


def to_yaml_of(flat: dict) -> str:
    """A flat config back into the nested YAML a checkpoint stores."""
    import yaml

    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return yaml.safe_dump(tree)


def test_init_from_a_model_file_or_a_checkpoint_with_a_new_head_and_size(process_group, tmp_path: Path) -> None:
    """model.init_from: every weight carried over; another image size resamples the positional
    tables, another number of classes leaves a fresh head; a checkpoint folder (or its run
    folder) gives the same weights as the engine held; what does not fit is one clear error."""
    options = {"widths": (16, 16), "heads": (2, 2), "depths": (1, 1)}
    torch.manual_seed(0)
    source = create_model("lsa_cifar_tiny", num_classes=5, **options)
    save_model_file(tmp_path / "model.pt", dict(source.cfg.__dict__), source.state_dict())
    target = create_model("lsa_cifar_tiny", num_classes=10, image_size=40, **options)
    fresh_head = target.head.weight.detach().clone()
    notes = init_model_from(target, tmp_path / "model.pt")
    assert notes == ["positional tables resampled to 40 px", "a new head for 10 classes"]
    mine, theirs = target.state_dict(), source.state_dict()
    for key, value in theirs.items():
        if key.endswith("pos_embed"):
            grid, new = (
                (32, 32) if key.startswith("patch") else (16, 16),
                (40, 40) if key.startswith("patch") else (20, 20),
            )
            assert torch.equal(mine[key], resize_pos_table(value, grid, new)), key
        elif not key.startswith("head."):
            assert torch.equal(mine[key], value), key
    assert torch.equal(target.head.weight, fresh_head)

    engine = make_engine(0)
    train_one_step(engine)
    folder = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=1, rank=0).save(
        engine, TrainState(step=1), ""
    )
    for path in (folder, tmp_path / "run"):
        model = make_engine(1).module
        assert init_model_from(model, path) == []
        assert all(torch.equal(v, engine.full_state_dict()[k]) for k, v in model.state_dict().items())

    wider = create_model("lsa_cifar_tiny", num_classes=10, widths=(24, 24), heads=(2, 2), depths=(1, 1))
    with pytest.raises(CheckpointError, match=r"model.init_from: .*model.pt's \S+ has shape .*another architecture"):
        init_model_from(wider, tmp_path / "model.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"model.init_from: cannot read .*junk.pt"):
        init_model_from(target, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match=r"model.init_from: .*missing.pt does not exist"):
        init_model_from(target, tmp_path / "missing.pt")


@pytest.mark.slow
def test_every_engine_continues_on_another_world_size(tmp_path: Path) -> None:
    """2 ranks -> 1 -> 2 (tests/reshard_worker.py under torch's elastic launcher): ZeRO 0-3
    (1-3 through DeepSpeed's universal checkpoint), fairscale's consolidated OSS state and torch
    DDP's whole AdamW state load
    with the writer's weights and lr, and the next step on the same global batch is the one the
    writer's world size takes (fp32): the optimizer state came through."""
    worker = ROOT / "tests" / "reshard_worker.py"
    for mode, nproc in (("start", 2), ("continue", 1), ("continue", 2)):
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        command = [*launcher, f"--master_port={free_port()}", str(worker), mode, str(tmp_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        if mode == "start":
            continue
        report = json.loads((tmp_path / f"report-continue-{nproc}.json").read_text())
        assert sorted(report) == ["ddp", "fairscale", "zero0", "zero1", "zero2", "zero3"]
        for name, checks in report.items():
            assert checks["weights_equal"] and checks["lr_equal"] and checks["next_lr_equal"], (name, checks)
            assert checks["next_step_max_diff"] < 1e-6 and checks["step_moved"] > 1e-4, (name, checks)
    assert not list(tmp_path.glob("*/checkpoints/.universal"))  # the converted copies are removed


class _RunsCode:
    """A pickle that runs a command when loaded: what a hostile checkpoint file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _rewrite_pickle(path: Path, data_pkl: bytes) -> None:
    """Replace the pickle inside the torch file `path` (a zip), keeping its other members."""
    import zipfile

    with zipfile.ZipFile(path) as old:
        members = {info.filename: old.read(info.filename) for info in old.infolist()}
    with zipfile.ZipFile(path, "w") as new:
        for name, data in members.items():
            new.writestr(name, data_pkl if name.endswith("/data.pkl") else data)


# A pickle that names only torch._utils._rebuild_tensor_v2, which every weights file names, and
# applies a BUILD to that function: full unpickling sets an attribute on it (a first step to
# changing how every later tensor loads); the scan of named globals finds nothing to refuse.
TAMPERING_PICKLE = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x08\x00\x00\x00tamperedK\x01sb."


def test_a_file_that_names_only_allowed_code_but_tampers_with_it_is_refused(process_group, tmp_path: Path) -> None:
    """It passes the scan; DeepSpeed's loads (resume, export) then read weights only, so the
    file is refused in one line and the loader is left as it was."""
    import torch._utils

    engine = make_engine(0)
    train_one_step(engine)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3, rank=0)
    folder = manager.save(engine, TrainState(step=1, zero_stage=1), "")
    (model_file,) = folder.glob("*model_states.pt")
    _rewrite_pickle(model_file, TAMPERING_PICKLE)
    vet(folder)  # the scan alone lets it through
    for attempt in (lambda: export_fp32(folder), lambda: manager.load(make_engine(1), folder)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        message = str(err.value)
        assert "a file holds more than weights" in message and "\n" not in message, message
    assert not hasattr(torch._utils._rebuild_tensor_v2, "tampered")
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch is set only while loading


def test_a_checkpoint_file_that_would_run_code_is_refused_unread(process_group, tmp_path: Path) -> None:
    """DeepSpeed unpickles its files in full; every file is checked for the classes it names
    first (tensors, containers and DeepSpeed's own bookkeeping only), for resume and export."""
    engine = make_engine(0)
    train_one_step(engine)
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3, rank=0)
    folder = manager.save(engine, TrainState(step=1, zero_stage=1), "")
    assert export_fp32(folder)[0]  # DeepSpeed's own files pass
    marker = tmp_path / "ran"
    (optim,) = folder.glob("*optim_states.pt")
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, optim)
    for attempt in (lambda: export_fp32(folder), lambda: manager.load(make_engine(1), folder)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        assert "names code that loading it would run (posix.system)" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
