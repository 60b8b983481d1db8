"""Training end to end: real DeepSpeed (and fairscale) engines across 2 gloo processes
started by launch/local.py, on the demo shards, with a tiny LSA."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import PAPER_RECIPE, local_command, worker_of_rank

from lsa_dist.checkpoint import CheckpointManager
from lsa_dist.dist import cpu_has_fp16, free_port
from lsa_dist.models import count_parameters, create_model
from lsa_dist.weights import export_fp32, load_model_file, save_model_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_local(
    tmp: Path, name: str, data: Path, *overrides: str, nproc: int = 2, timeout: int = 600
) -> subprocess.CompletedProcess:
    return helpers.run_local(tmp, name, data, "tracking.enabled=false", *overrides, nproc=nproc, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_file(run_dir / "model.pt").state_dict()


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_zero_stage_and_precision_trains_and_matches_stage_0(demo_shards: Path, tmp_path: Path) -> None:
    curves = {}
    for stage in (0, 3):  # ZeRO-2 below (offload) and in most other tests, ZeRO-1 in test_combinations.py
        proc = run_local(
            tmp_path,
            f"z{stage}",
            demo_shards,
            f"engine.zero_stage={stage}",
            "engine.precision=fp32",
            "train.max_steps=12",
        )
        assert_ok(proc)
        curves[stage] = losses(tmp_path / f"z{stage}")
    first, last = curves[0][1], curves[0][12]
    assert last < first, f"the loss did not fall: {first} -> {last}"
    for step, loss in curves[0].items():
        assert curves[3][step] == pytest.approx(loss, rel=2e-4, abs=1e-5), step
    # fp16 with dynamic loss scaling, and ZeRO-Offload (optimizer state and step on the CPU,
    # DeepSpeed's compiled CPU Adam) follow the same curve
    cases = [("offload", ("engine.zero_stage=2", "engine.precision=fp32", "engine.offload_optimizer=true"), 2e-4)]
    fp16 = ("engine.zero_stage=2", "engine.precision=fp16")
    if cpu_has_fp16():
        cases.append(("fp16", fp16, 1e-3))
    else:  # refused before any process starts, naming the key
        proc = run_local(tmp_path, "fp16", demo_shards, *fp16, "train.max_steps=12")
        assert proc.returncode == 2 and proc.stderr.startswith("error: engine.precision: fp16 needs a GPU or a CPU")
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "fp16").exists()
    for name, overrides, rel in cases:
        assert_ok(run_local(tmp_path, name, demo_shards, *overrides, "train.max_steps=12"))
        curve = losses(tmp_path / name)
        assert sorted(curve) == sorted(curves[0]), name
        for step, loss in curves[0].items():
            assert curve[step] == pytest.approx(loss, rel=rel, abs=1e-5), (name, step)


def test_activation_checkpointing_gives_the_same_losses(demo_shards: Path, tmp_path: Path) -> None:
    common = ("engine.precision=fp32", "train.max_steps=6")
    for stage in (3,):  # ZeRO-3 gathers parameters again in the recomputed forward: the hard case
        assert_ok(run_local(tmp_path, f"plain{stage}", demo_shards, f"engine.zero_stage={stage}", *common))
        assert_ok(
            run_local(
                tmp_path,
                f"ckpt{stage}",
                demo_shards,
                f"engine.zero_stage={stage}",
                "engine.activation_checkpointing=all",
                *common,
            )
        )
        assert losses(tmp_path / f"ckpt{stage}") == pytest.approx(losses(tmp_path / f"plain{stage}"), rel=1e-6)
    # with an EMA: it keeps its own plain fp32 copy, evaluated on its own weights (a copy of the
    # patched model would run the live blocks, and in bf16 fail on a dtype mismatch)
    ema = ("engine.precision=bf16", "train.max_steps=6", "optim.ema_decay=0.9")
    every2 = ("engine.activation_checkpointing=every_k", "engine.checkpoint_every_k=2")
    assert_ok(run_local(tmp_path, "every2", demo_shards, *every2, *ema))
    assert_ok(run_local(tmp_path, "bf16", demo_shards, *ema))
    assert losses(tmp_path / "every2") == losses(tmp_path / "bf16")
    final = [final_metrics(tmp_path / name) for name in ("every2", "bf16")]
    assert final[0]["val_ema/loss"] == final[1]["val_ema/loss"] and final[0]["val_ema/images"] == 359
    assert final[0]["val_ema/loss"] != final[0]["val/loss"]


def final_metrics(run_dir: Path) -> dict[str, float]:
    lines = (run_dir / "final_metrics.txt").read_text().split("\n")
    return {key: float(value) for key, value in (line.split() for line in lines if line)}


def test_compiled_model_trains_like_the_eager_one(demo_shards: Path, tmp_path: Path) -> None:
    """engine.compile=true (torch.compile, inductor) with activation checkpointing of every block:
    the same losses as eager, within float32 rounding of reordered kernels. build_engine compiles
    the plain module in place before either backend wraps it, so one backend shows it (a cold
    compilation costs minutes here). One process: two would compile the same graphs twice."""
    for engine in ("deepspeed",):
        common = (f"engine.backend={engine}", "engine.zero_stage=1", "engine.precision=fp32")
        common += ("engine.activation_checkpointing=all", "train.max_steps=5")
        assert_ok(run_local(tmp_path, f"{engine}-eager", demo_shards, *common, nproc=1))
        proc = run_local(tmp_path, f"{engine}-compiled", demo_shards, *common, "engine.compile=true", nproc=1)
        assert_ok(proc)
        assert f"{engine} ZeRO-1 fp32, compiled" in proc.stdout
        eager, compiled = losses(tmp_path / f"{engine}-eager"), losses(tmp_path / f"{engine}-compiled")
        assert sorted(compiled) == list(range(1, 6))
        assert compiled == pytest.approx(eager, rel=1e-4)


# the paper's recipe with a loader worker (its augmentation in another process) and progressive
# resizing: epoch 0 trains at 24 px, epoch 1 at 32 (the model's size), so a run resumed in epoch 0
# goes through a size change
PROGRESSIVE = ("data.progressive.start=24", "data.progressive.multiple=8", "data.progressive.last_epoch=1")
INTERRUPTED = (
    "engine.zero_stage=2",
    "engine.precision=fp32",
    "optim.epochs=2",
    *PAPER_RECIPE,
    *PROGRESSIVE,
    "data.num_workers=1",
)


@pytest.fixture(scope="module")
def uninterrupted(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of the run the interrupted ones must reproduce."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_local(tmp, "straight", demo_shards, *INTERRUPTED))
    return weights(tmp / "straight")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until metrics.jsonl shows `step` (training is under way, past start-up)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {run_dir}")


def test_interrupted_run_resumes_bit_for_bit(demo_shards: Path, tmp_path: Path, uninterrupted: dict) -> None:
    """SIGTERM to the launcher's whole process group mid-epoch (what `timeout`, systemd and
    schedulers send), with a loader worker in every rank: the loader workers live on, the ranks
    checkpoint and stop with exit 3; the same command finishes the run bit for bit."""
    cmd = local_command(tmp_path, "interrupted", demo_shards, "tracking.enabled=false", *INTERRUPTED)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    wait_for_step(tmp_path / "interrupted", 5, proc)
    # one owner per run: the same command again, while this one trains, is refused. The run is
    # held still meanwhile (SIGSTOP), so that on a busy host it cannot finish first.
    with helpers.held_still(proc.pid):
        second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "is in use by launch/local.py (host " in second.stderr and f"pid {proc.pid}, since " in second.stderr
    wait_for_step(tmp_path / "interrupted", 30, proc)  # the signal follows a state, not a delay
    helpers.signal_local_run(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    assert "stopped after checkpointing" in out and "DataLoader worker" not in out, out[-3000:]
    latest = CheckpointManager(tmp_path / "interrupted" / "checkpoints", 3, 0).latest()
    step = json.loads((latest / "meta.json").read_text())["step"]
    assert 30 <= step < 88 and step % 44 != 0, step  # mid-epoch
    # a new lineage in a folder that holds one is refused, naming the ways out; nothing is touched
    fresh = subprocess.run([*cmd, "train.resume=never"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 2 and fresh.stderr.startswith("error: train.resume=never: "), fresh.stderr
    assert "train.name=" in fresh.stderr and "train.overwrite=true" in fresh.stderr
    assert CheckpointManager(tmp_path / "interrupted" / "checkpoints", 3, 0).latest() == latest
    # so is a resume that changes the run's mathematics (a new lr would be silently ignored)
    changed = subprocess.run([*cmd, "optim.lr=1e-3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "would change the run: optim.lr 0.002 -> 0.001" in changed.stderr
    assert "train.accept_changes=[optim.lr]" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    assert_ok(subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600))
    resumed = weights(tmp_path / "interrupted")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_the_step_loop_reads_nothing_back_from_the_device_between_logging_steps(tmp_path: Path) -> None:
    """2 ranks, the paper's recipe with EMA on ZeRO-2 bf16 on train.synthetic data (in memory, no
    dataset), logging at the defaults (demo.yaml's progress window, tracking.log_every's default):
    but for the first step's end (the start-up cost, read once), lsa_dist's code calls no .item(),
    float(), .tolist(), .cpu() (...) on a tensor at a step that closes no window: the loss is
    summed on the device, the gradient norm read only when logged, normalisation constants stay
    on the device, and the stop vote goes through a CPU group in the background
    (tests/sync_probe.py counts the calls per step)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command = [*launcher, str(ROOT / "tests" / "sync_probe.py"), str(tmp_path / "no-dataset"), str(tmp_path)]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "sync_counts.json").read_text())
    assert report["status"] == "finished" and report["step"] == 12
    assert report["steps_per_epoch"] == 1_281_167 // (2 * 16)  # synthetic: ImageNet-1k's epoch
    progress_every, log_every = report["log_every"]
    assert log_every > 1 and progress_every > 1  # no window closes at every step by default
    rows = report["reads"]
    first = [(name, where.split(":")[0], n) for step, name, where, n in rows if step == 1]
    assert first == [("item", "telemetry.py", 1)], rows
    windows = {s for s in range(2, 13) if s % progress_every == 0 or s % log_every == 0 or s == 12}
    assert windows and {step for step, *_ in rows if step > 1} == windows, rows  # reads at those steps only


def test_a_run_continues_on_another_world_size_with_each_sample_once(demo_shards: Path, tmp_path: Path) -> None:
    """The paper's recipe on ZeRO-2: 2 ranks to step 10 (mid-epoch 0), 1 rank to step 40,
    2 ranks with data.batch_size 8 instead of 16 (an accepted change) to 10 steps into epoch 1.
    Epoch 0 goes on each time with the samples not yet read (10 + 30 + 39 batches: 1438 samples
    less 10 x 32 and 30 x 16, in global batches of 16), the lr schedule follows the epochs, and it
    is one MLflow run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = (*INTERRUPTED, f"tracking.uri={uri}", "checkpoint.every_steps=0")
    smaller = ("data.batch_size=8", "train.accept_changes=[data.batch_size]")
    launches = [(2, "train.max_steps=10"), (1, "train.max_steps=40"), (2, "train.max_steps=89", *smaller)]
    outputs = []
    for nproc, *overrides in launches:
        proc = helpers.run_local(tmp_path, "moved", demo_shards, *common, *overrides, nproc=nproc, timeout=600)
        assert_ok(proc)
        outputs.append(proc.stdout)
    said = "loader workers x batch 16 on {}: epoch 0 goes on with its unread samples, {} batches per rank"
    assert f"resumed 2 ranks x 1 {said.format('1 x 1 x 16', 69)}" in outputs[1]
    assert f"resumed 1 ranks x 1 {said.format('2 x 1 x 8', 39)}" in outputs[2]
    rows = [json.loads(line) for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "epoch" in r and "train/epoch_loss" in r] == [79]
    loss = losses(tmp_path / "moved")
    assert sorted(loss) == list(range(1, 90))  # every step once, none repeated or skipped
    for switch in (10, 40):  # no jump where the world size changed
        before = sum(loss[s] for s in range(switch - 4, switch + 1)) / 5
        assert abs(loss[switch + 1] - before) < 0.5, (switch, loss[switch + 1], before)
    lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    # warmup (half an epoch) in epochs: on 1 rank an epoch has 89 steps, so each step adds half as much
    two, one = lr[10] - lr[9], lr[12] - lr[11]
    assert 0.45 < one / two < 0.55 and 0 < lr[11] - lr[10] < 1.5 * one
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 90))


PROGRESS_LINE = re.compile(
    r"^step (\d+)/88  epoch (\d+\.\d\d)  loss (\d+\.\d{4})  lr (\S+)  (\S+) img/s  data (\S+) ms  "
    r"step (\S+) ms  mem (\d+) MB  eta (\d+:\d\d:\d\d)$",
    re.MULTILINE,
)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(
    demo_shards: Path, tmp_path: Path, uninterrupted: dict
) -> None:
    """--max-restarts: a worker SIGKILLed mid-epoch; all workers restart from the last checkpoint
    (train.resume=never acts at launch only) and the run ends as if nothing had happened. Its
    output, piped, has plain progress lines."""
    overrides = (*INTERRUPTED, "checkpoint.every_steps=10", "train.resume=never")
    cmd = local_command(tmp_path, "restarted", demo_shards, "tracking.enabled=false", *overrides)
    cmd += ["--max-restarts", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "restarted", 25, proc)
    os.kill(worker_of_rank(tmp_path / "restarted", 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert re.search(r"rank \d failed \(signal 9\); restarting the workers from the last checkpoint \(1 of 2\)", err)
    assert re.search(r"resumed from \S+/step-000000(20|30) ", out), out[-3000:]
    assert "after 1 restart(s)" in out
    resumed = weights(tmp_path / "restarted")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    lines = PROGRESS_LINE.findall(out)  # train.log_every=10 (the default): steps 10, 20, ..., 80 and 88
    assert {int(m[0]) for m in lines} >= {10, 20, 40, 50, 60, 70, 80, 88}, out[-3000:]
    for step, epoch, loss, lr, rate, wait, step_ms, mem, _eta in lines:
        assert 0 < float(loss) < 5 and 0 < float(lr) < 1 and float(rate) > 0 and float(step_ms) > 0
        assert float(wait) >= 0 and int(mem) > 100 and abs(float(epoch) - int(step) / 44) < 0.01
    assert lines[-1][-1] == "0:00:00"


def test_a_stop_during_evaluation_checkpoints_at_once_and_the_evaluation_runs_on_resume(
    demo_shards: Path, tmp_path: Path
) -> None:
    """SIGHUP to the workers (a closed session) while the epoch-end evaluation runs: it is cut
    short, the run checkpoints and exits within 30 s, and the resumed run evaluates first."""
    # the training split as validation, in batches of 2: an evaluation of several seconds
    slow_eval = ("data.val_split=train", "data.eval_batch_size=2", "train.max_steps=50", "checkpoint.every_steps=0")
    cmd = local_command(tmp_path, "hup", demo_shards, "tracking.enabled=false", *slow_eval)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path / "hup", 44, proc)  # the epoch's last step: its evaluation follows
    subprocess.run(["pkill", "-HUP", "-f", f"{tmp_path / 'hup'}/launch_config.yaml"], check=True)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3 and time.monotonic() - sent < 30, out[-3000:]
    assert "stop requested (SIGHUP)" in out
    meta = json.loads((CheckpointManager(tmp_path / "hup" / "checkpoints", 3, 0).latest() / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["batch"], meta["eval_pending"]) == (44, 1, 0, True)
    rows = [json.loads(line) for line in (tmp_path / "hup" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val/top1" in r for r in rows)
    assert_ok(subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600))
    rows = [json.loads(line) for line in (tmp_path / "hup" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/top1" in r]  # the epoch's other metrics were logged at the stop, once
    assert [r["step"] for r in evals] == [44] and evals[0]["val/images"] == 1438
    assert [r["epoch"] for r in rows if "epoch" in r and r["step"] == 44] == [1]
    assert max(r["step"] for r in rows) == 50


def test_a_shard_read_that_fails_after_the_stop_request_is_the_stop(demo_shards: Path, tmp_path: Path) -> None:
    """A `pipe:` reader ended by the signal that stops the run (here it signals its training
    process, then fails): the read error is the stop (checkpoint, exit 3), not bad input
    (exit 2); the same command resumes and finishes once reads work again."""
    mark = tmp_path / "fail-reads"
    reader = f"if [ -e {mark} ]; then kill -USR1 $PPID; sleep 2; exit 1; fi; cat {demo_shards}/wds/{{shard}}"
    args = ("tracking.enabled=false", f"data.urls=pipe:{reader}", "optim.epochs=1", "checkpoint.every_steps=0")
    cmd = local_command(tmp_path, "reads", demo_shards, *args, nproc=1)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path / "reads", 3, proc)
    mark.touch()  # the next shard opened (one per 150 images) fails
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    assert "read after the stop request (SIGUSR1); stopping as asked" in out and "cannot read shard" in out
    meta = json.loads((CheckpointManager(tmp_path / "reads" / "checkpoints", 3, 0).latest() / "meta.json").read_text())
    assert 3 <= meta["step"] < 89
    mark.unlink()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert_ok(done)
    assert f"resumed from {tmp_path / 'reads'}" in done.stdout + done.stderr


def workers_of(run_dir: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"{run_dir}/launch_config.yaml"], capture_output=True, text=True)
    return out.stdout.split()


def wait_until_no_workers(run_dir: Path, since: float, limit: float = 30) -> float:
    while workers_of(run_dir) and time.monotonic() - since < limit + 5:
        time.sleep(0.2)
    assert not workers_of(run_dir), f"workers of {run_dir} outlived their launcher"
    return time.monotonic() - since


def test_no_worker_outlives_a_killed_launcher(demo_shards: Path, tmp_path: Path) -> None:
    """launch/local.py SIGKILLed during the workers' start-up, then mid-training: every worker
    is gone within 30 s (after a checkpoint when it was training), and the run resumes."""
    run = tmp_path / "orphans"
    cmd = local_command(tmp_path, "orphans", demo_shards, "tracking.enabled=false", "train.max_steps=200")
    for moment in ("start-up", "training"):
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if moment == "start-up":
            while not workers_of(run) and proc.poll() is None:
                time.sleep(0.01)
        else:
            wait_for_step(run, 5, proc)
        proc.kill()
        proc.wait()
        assert wait_until_no_workers(run, time.monotonic()) < 30, moment
    latest = CheckpointManager(run / "checkpoints", 3, 0).latest()
    assert latest is not None and json.loads((latest / "meta.json").read_text())["step"] >= 5
    proc = subprocess.run([*cmd[:-1], "train.max_steps=12"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]


def test_a_closed_stdout_does_not_stop_the_run(demo_shards: Path, tmp_path: Path) -> None:
    """The launcher's reader goes away after one line (`| head -1`): training carries on to the
    end, with exit 0 and its output in the run's logs."""
    cmd = local_command(tmp_path, "piped", demo_shards, "tracking.enabled=false", "train.max_steps=6", nproc=1)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, err[-3000:]
    assert "Traceback" not in err and (tmp_path / "piped" / "model.pt").is_file()
    assert "done:" in (tmp_path / "piped" / "logs" / "rank0.log").read_text()


def test_a_bad_latest_checkpoint_falls_back_and_a_named_one_is_not_retried(demo_shards: Path, tmp_path: Path) -> None:
    """The run's latest checkpoints cannot be used: a corrupt meta.json, a corrupt or missing
    config.yaml (passed over by the launcher before any worker starts) and a truncated engine file
    (found by the worker): the newest good one is used, with a warning naming each part and an
    MLflow tag, and the bad ones are set aside. A checkpoint the user named is not replaced by
    another: its bad-input error (exit 2) ends the job at once, even with restarts left."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = ("tracking.enabled=true", f"tracking.uri={uri}", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    assert_ok(run_local(tmp_path, "corrupt", demo_shards, *tracked, "train.max_steps=10", nproc=1))
    root = tmp_path / "corrupt" / "checkpoints"
    step = {n: root / f"step-{n:08d}" for n in (2, 4, 6, 8, 10)}
    (step[10] / "meta.json").write_text('{"step": 10, ')
    (step[8] / "config.yaml").write_text("model: [unclosed\n")
    (step[6] / "config.yaml").unlink()
    states = next(step[4].glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    proc = run_local(tmp_path, "corrupt", demo_shards, *tracked, "train.max_steps=12", nproc=1)
    assert_ok(proc)
    for n, part in ((10, "meta.json is corrupt"), (8, "config.yaml is corrupt"), (6, "config.yaml is missing")):
        assert f"warning: cannot use checkpoint {step[n]}: {part}" in proc.stdout, proc.stdout[-3000:]
    assert (
        "warning: cannot load checkpoint" in proc.stdout
        and f"falling back to the previous checkpoint {step[2]}" in proc.stdout
    )
    assert "resumed from" in proc.stdout and "step 2)" in proc.stdout
    aside = sorted(p.name for p in (tmp_path / "corrupt" / "set_aside").glob("*/step-*"))
    assert aside == [f"step-{n:08d}" for n in (4, 6, 8, 10)]
    from mlflow import MlflowClient

    (run,) = MlflowClient(uri).search_runs(MlflowClient(uri).search_experiments()[0].experiment_id)
    assert run.data.tags["resume.fallback"] == "step-00000004 could not be loaded; resumed from step-00000002"
    named = root / "step-00000012"
    states = next(named.glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    cmd = local_command(tmp_path, "corrupt", demo_shards, "tracking.enabled=false", f"train.resume={named}", nproc=1)
    proc = subprocess.run([*cmd, "--max-restarts", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot load checkpoint" in proc.stdout + proc.stderr
    assert "restarting" not in proc.stderr and "failed (exit code 2)" in proc.stderr
    (named / "config.yaml").unlink()  # a named checkpoint with an unreadable part: refused before any worker starts
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: cannot load checkpoint {named}: config.yaml is missing"


def test_a_restart_during_start_up_keeps_the_lineage_the_launch_chose(demo_shards: Path, tmp_path: Path) -> None:
    """train.resume=never with train.overwrite on a run with checkpoints, and the worker killed
    while it is still starting (before it could decide anything): the launcher has already set
    the old lineage aside, so the restarted worker starts the new run instead of resuming the
    old checkpoints."""
    name, run_dir = "lineage", tmp_path / "lineage"
    quiet = ("tracking.enabled=false", "checkpoint.every_steps=2")
    assert_ok(run_local(tmp_path, name, demo_shards, *quiet, "train.max_steps=4", nproc=1))
    cmd = local_command(tmp_path, name, demo_shards, *quiet, "train.max_steps=2", "train.resume=never", nproc=1)
    cmd += ["train.overwrite=true", "--max-restarts", "1"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:  # the state: the worker process exists and has written nothing to its log yet
        try:
            worker = worker_of_rank(run_dir, 0)
            break
        except AssertionError:
            assert time.time() < deadline and launcher.poll() is None, "the worker never started"
            time.sleep(0.05)
    log = run_dir / "logs" / "rank0.log"
    before = log.read_text() if log.exists() else ""
    os.kill(worker, signal.SIGKILL)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    assert "restarting the workers from the last checkpoint (1 of 1)" in err
    attempt = log.read_text()[len(before) :]
    assert "resumed from" not in attempt and "run lineage:" in attempt, attempt[-3000:]
    aside = sorted(p.name for p in (run_dir / "set_aside").glob("*/step-*"))
    assert aside == ["step-00000002", "step-00000004"]
    assert [p.name for p in CheckpointManager(run_dir / "checkpoints", 3, 0).complete()] == ["step-00000002"]


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(demo_shards: Path, tmp_path: Path) -> None:
    cmd = local_command(
        tmp_path,
        "killed",
        demo_shards,
        "tracking.enabled=false",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "engine.zero_stage=1",
        nproc=1,
    )
    root = tmp_path / "killed" / "checkpoints"
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 300
        before = {p.name for p in root.glob("step-*")} if root.exists() else set()
        # wait until a checkpoint is being written (its staging folder exists), then kill everything
        while time.time() < deadline:
            staging = list((root / ".staging").glob("step-*")) if (root / ".staging").exists() else []
            if staging and {p.name for p in root.glob("step-*")} - before:
                break
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "killed")], check=False)
        proc.wait()
        kills += 1
        latest = CheckpointManager(root, 2, 0).latest()
        assert latest is not None and (latest / "meta.json").is_file()
        state, meta = export_fp32(latest)  # the previous checkpoint is whole and loadable
        assert meta["step"] >= 1 and "head.weight" in state
    assert kills == 3
    resume = [*cmd, "checkpoint.every_steps=0", "train.max_steps=30"]  # kills came at steps 1-3
    proc = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    assert "resumed from" in proc.stdout
    assert not list(root.glob(".staging/step-*"))  # the partial checkpoints were cleared


def test_bf16_runs_export_fp32_master_weights_register_under_zero3_and_init_other_runs(
    demo_shards: Path, tmp_path: Path
) -> None:
    """Under bf16 the module holds casts; model.pt must hold the optimizer's fp32 master weights:
    the same tensors that tools/export_checkpoint.py (DeepSpeed's zero_to_fp32) reads from the
    final checkpoint, for ZeRO-1 and ZeRO-3. Under ZeRO-3 the start-up line counts every
    parameter, the registered MLflow model is whole, and model.init_from the run's folder
    continues from those weights under another stage."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for stage in (1, 3):
        run = tmp_path / f"z{stage}"
        extra = ("tracking.enabled=true", f"tracking.uri={uri}", "tracking.register_model=lsa_z3") if stage == 3 else ()
        common = (f"engine.zero_stage={stage}", "engine.precision=bf16", "train.max_steps=10")
        proc = run_local(tmp_path, run.name, demo_shards, *common, *extra)
        assert_ok(proc)
        params = count_parameters(load_model_file(run / "model.pt"))
        assert f"({params / 1e6:.2f} M params" in proc.stdout  # counted before ZeRO-3 partitions the model
        export = tmp_path / f"exported{stage}.pt"
        proc = subprocess.run(
            [sys.executable, "tools/export_checkpoint.py", str(run), "--out", str(export)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        exported, trained = load_model_file(export), load_model_file(run / "model.pt")
        weights, reference = trained.state_dict(), exported.state_dict()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), stage
        assert any((w.bfloat16().float() != w).any() for w in weights.values())  # not bf16 casts
    # model.init_from the ZeRO-3 run's folder, evaluated under ZeRO-1: that run's final metrics
    again = (f"model.init_from={run}", "train.eval_only=true", *common, "engine.zero_stage=1")
    proc = run_local(tmp_path, "again", demo_shards, *again)
    assert_ok(proc)
    final = dict(line.split() for line in (run / "final_metrics.txt").read_text().splitlines())
    rows = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    evaluated = next(r for r in rows if "val/top1" in r)
    # the same bf16 weights; ZeRO-3's gathered forward sums in another order: bf16 rounding apart,
    # which can flip one near-tie prediction of this near-chance model
    assert abs(evaluated["val/top1"] - float(final["val/top1"])) <= 100 / 359 + 1e-9
    assert evaluated["val/loss"] == pytest.approx(float(final["val/loss"]), rel=1e-4)
    import mlflow

    mlflow.set_tracking_uri(uri)
    registered = mlflow.pytorch.load_model("models:/lsa_z3/1").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(registered(images), trained.eval()(images))
    proc = subprocess.run(
        [sys.executable, "tools/export_checkpoint.py", str(run), "--eval-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "val top-1" in proc.stdout, proc.stderr


def test_init_from_a_model_of_another_size_and_head(demo_shards: Path, tmp_path: Path) -> None:
    """model.init_from: a 5-class model file made for 32 px fine-tunes at 40 px with a new
    10-class head (a checkpoint folder of another stage: the bf16 test above)."""
    options = {"patch_stride": 2, "widths": (16, 16), "heads": (2, 2), "depths": (2, 1)}  # demo.yaml + TINY
    source = create_model("lsa_cifar_tiny", num_classes=5, **options)
    save_model_file(tmp_path / "pretrained.pt", dict(source.cfg.__dict__), source.state_dict())
    proc = run_local(
        tmp_path,
        "finetuned",
        demo_shards,
        f"model.init_from={tmp_path / 'pretrained.pt'}",
        "data.image_size=40",
        "train.max_steps=3",
    )
    assert_ok(proc)
    assert "positional tables resampled to 40 px; a new head for 10 classes" in proc.stdout
    assert load_model_file(tmp_path / "finetuned" / "model.pt").cfg.image_size == 40


def test_bad_config_fails_before_any_process_starts(demo_shards: Path, tmp_path: Path) -> None:
    proc = run_local(tmp_path, "bad", demo_shards, "optim.lrr=0.1")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: optim.lrr: unknown key (Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?); check the spelling against lsa_dist/config.py"
    )
    assert not (tmp_path / "bad").exists()
    proc = run_local(tmp_path, "bad", demo_shards, "engine.backend=fairscale", "engine.zero_stage=3")
    assert proc.returncode == 2 and "engine.zero_stage: 3 needs engine.backend=deepspeed" in proc.stderr
    proc = run_local(tmp_path, "bad", demo_shards, "data.batch_size=10", "optim.grad_accum_steps=4")
    assert proc.returncode == 2 and "data.batch_size: 10 is not divisible by optim.grad_accum_steps=4" in proc.stderr
    proc = run_local(tmp_path, "bad", tmp_path / "nowhere")
    assert proc.returncode == 2 and "no dataset.json in" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_a_crashing_worker_ends_the_job_with_its_error(demo_shards: Path, tmp_path: Path) -> None:
    cmd = local_command(tmp_path, "crash", demo_shards, "tracking.enabled=false", "optim.epochs=50")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "crash" / "logs"
    deadline = time.time() + 300  # until both ranks log and rank 0 has announced the run (start-up done)
    while time.time() < deadline and not (
        (logs / "rank1.log").exists()
        and (logs / "rank0.log").exists()
        and "run crash" in (logs / "rank0.log").read_text()
    ):
        time.sleep(0.1)
    time.sleep(2)
    subprocess.run(
        ["pkill", "-9", "-f", "-n", f"{tmp_path / 'crash'}/launch_config.yaml"], check=False
    )  # the newest worker
    start = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert time.time() - start < 60
    assert "failed (signal 9)" in err
