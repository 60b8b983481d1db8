#!/usr/bin/env python
"""Combination testing: every configuration of the options that change the training path
either trains and resumes exactly, or is refused at load.

    python tools/combinations.py [--all] [--only KEY ...] [--data DIR] [--out DIR [--resume]] [--json FILE]

A case gives each option in OPTIONS one of its values. By default the cases form a covering
array (greedy, `pairwise`): every pair of values of any two options that the config accepts together
is in at least one trained case, and every pair it refuses is a refused case of its own.
`--all` runs the full product instead (of every option, or of those named with `--only`, the
others at their first value), for long runs outside CI.

Each trained case is a CPU-sized run of a tiny LSA on a small dataset (8 images a class, made
from the demo digits unless --data names a converted dataset): run without interruption, then
stopped at step STOP (train.max_steps, which checkpoints) and resumed by the same command; its
final weights (and EMA weights) must equal the uninterrupted run's tensor by tensor. A refused
case must fail at load, before any process starts, with one line. One-rank cases run in one
process (this tool's worker mode); two-rank cases through launch/local.py. Prints a table of
every case (trained and resumed exactly / refused / failed) and its time; exit 0 only if no
case failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from chaos import compare  # noqa: E402

# option -> its values, the first the default; each value maps to config overrides in `overrides`
OPTIONS: dict[str, list[Any]] = {
    "engine.backend": ["deepspeed", "fairscale"],
    "engine.zero_stage": [1, 0, 2, 3],
    "engine.precision": ["fp32", "bf16", "fp16"],
    "engine.activation_checkpointing": ["none", "all", "every_k"],
    "engine.compile": [False, True],
    "engine.offload_optimizer": [False, True],
    "optim.ema_decay": [0.0, 0.9],
    "optim.grad_accum_steps": [1, 2],
    "data.format": ["wds", "pipe", "ffcv"],
    "data.augment.recipe": ["cifar", "imagenet"],
    "data.progressive": [False, True],
    "model.init_from": [False, True],
    "ranks": [1, 2],
}
# a tiny LSA on the small dataset: 10 steps an epoch on one rank, 5 on two; 2 epochs
BASE = [
    "model.options.widths=[16,16]",
    "model.options.heads=[2,2]",
    "model.options.depths=[2,1]",
    "data.batch_size=8",
    "data.eval_batch_size=40",
    "data.num_workers=0",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "tracking.enabled=false",
    "tracking.log_every=1",
    "checkpoint.every_steps=0",
]
# the paper's recipe: every source of training randomness that resume must carry on
PAPER_RECIPE = [
    "data.augment.recipe=imagenet",
    "model.drop_path_rate=0.1",
    "data.augment.rand_augment=rand-m9-mstd0.5-inc1",
    "data.augment.reprob=0.25",
    "data.augment.mixup=0.8",
    "data.augment.cutmix=1.0",
]
PROGRESSIVE = [  # 16 px in epoch 0, 32 px (the model's size) in epoch 1
    "data.progressive.start=16",
    "data.progressive.end=32",
    "data.progressive.first_epoch=0",
    "data.progressive.last_epoch=1",
    "data.progressive.multiple=8",
]
RECOMPILE_LIMIT = "hit config.recompile_limit"
STOP = 7  # mid-epoch on one rank (10 steps an epoch), in the second epoch on two
CONFIG = ROOT / "configs" / "demo.yaml"


@dataclass
class Case:
    values: dict[str, Any]
    outcome: str = ""  # "resumed exactly" | "resumed, steps once" (FFCV) | "refused" | "failed"
    detail: str = ""  # the refusal's line, or what failed
    identical: str = ""  # "24/24" tensors equal to the uninterrupted run's
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """The case's run folder name: its values in option order."""
        return "-".join(str(v) for v in self.values.values()).replace(".", "")

    @property
    def ranks(self) -> int:
        return int(self.values.get("ranks", 1))


@dataclass
class Setting:
    """What every case shares: the dataset and the model file model.init_from points at."""

    data: Path
    init_file: Path
    out: Path
    extra: list[str] = field(default_factory=list)


def overrides(case: Case, setting: Setting, name: str = "") -> list[str]:
    """The config overrides of a case's run `name` (default: the case's own), after BASE."""
    out = [*BASE, f"data.root={setting.data}", f"train.output_dir={setting.out}", f"train.name={name or case.name}"]
    for key, value in case.values.items():
        if key == "data.format":
            out += {"wds": [], "ffcv": ["data.format=ffcv"]}.get(
                value, [f"data.urls=pipe:cat {setting.data}/wds/{{shard}}"]
            )
        elif key == "data.augment.recipe":
            out += PAPER_RECIPE if value == "imagenet" else [f"{key}={value}"]
        elif key == "data.progressive":
            out += PROGRESSIVE if value else []
        elif key == "model.init_from":
            out += [f"model.init_from={setting.init_file}"] if value else []
        elif key != "ranks":
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out + setting.extra


def refusal(case: Case, setting: Setting) -> str:
    """The one-line error the launchers give this case before any process starts, or ''."""
    from lsa_dist import cli
    from lsa_dist.config import load_config

    try:
        cfg = load_config(CONFIG, overrides(case, setting))
        cli.preflight(cfg, case.ranks)
    except cli.USER_ERRORS as err:
        return str(err).splitlines()[0]
    return ""


# the values that make a case expensive, costliest first: their pairs are covered first, in as
# few cases as the greedy finds, so that the rest of the cases can do without them
EXPENSIVE = [("ranks", 2), ("engine.compile", True)]


def pairwise(options: dict[str, list[Any]], setting: Setting, tries: int = 4) -> list[Case]:
    """Trained cases covering every pair of values the config accepts together, then a refused
    case for each value refused on its own and each pair refused together (the other options
    at their first value). The trained cases are built greedily (`_greedy`) `tries` times with
    different seeds; the cheapest set (fewest two-rank cases, then fewest cases) is kept."""
    keys = list(options)
    default = {k: options[k][0] for k in keys}
    checked: dict[tuple, str] = {}

    def refused_with(values: dict[str, Any]) -> str:
        row = tuple({**default, **values}.items())
        if row not in checked:
            checked[row] = refusal(Case(dict(row)), setting)
        return checked[row]

    refused = [Case({**default, k: v}) for k in keys for v in options[k][1:] if refused_with({k: v})]
    usable = {k: [v for v in options[k] if not refused_with({k: v})] for k in keys}
    bad, wanted = set(), set()
    for a, b in itertools.combinations(keys, 2):
        for va, vb in itertools.product(usable[a], usable[b]):
            if refused_with({a: va, b: vb}):
                bad.add(_pair(keys, a, va, b, vb))
                refused.append(Case({**default, a: va, b: vb}))
            else:
                wanted.add(_pair(keys, a, va, b, vb))
    best = min(
        (_greedy(keys, usable, bad, set(wanted), refused_with, seed) for seed in range(tries)),
        key=lambda rows: (sum(int(r.get("ranks", 1)) > 1 for r in rows), len(rows)),
    )
    return [Case(row) for row in best] + refused


def _pair(keys: list[str], a: str, va: Any, b: str, vb: Any) -> tuple:
    return (a, va, b, vb) if keys.index(a) < keys.index(b) else (b, vb, a, va)


def _greedy(keys: list[str], usable: dict, bad: set, wanted: set, refused_with: Any, seed: int) -> list[dict]:
    """Rows covering `wanted`: each starts from a pair not yet covered (one with an EXPENSIVE
    value while any is left) and gives every other option the value covering most new pairs,
    the earlier (cheaper) value on a tie, never one refused with a value already chosen; of a
    few such rows the one covering most is kept, if the config accepts it whole."""

    def covers(row: dict[str, Any]) -> set:
        return {_pair(keys, a, row[a], b, row[b]) for a, b in itertools.combinations(keys, 2)}

    def expensive(pair: tuple, key: str, value: Any) -> bool:
        return (pair[0], pair[1]) == (key, value) or (pair[2], pair[3]) == (key, value)

    rng, rows = random.Random(seed), []
    while wanted:
        pool = next((found for k, v in EXPENSIVE if (found := [p for p in wanted if expensive(p, k, v)])), list(wanted))
        best: dict[str, Any] | None = None
        for start in rng.sample(sorted(pool, key=repr), min(8, len(pool))):
            row = {start[0]: start[1], start[2]: start[3]}
            for k in keys:
                if k in row:
                    continue
                allowed = [v for v in usable[k] if not any(_pair(keys, k, v, j, w) in bad for j, w in row.items())]
                row[k] = max(allowed, key=lambda v: sum(_pair(keys, k, v, j, w) in wanted for j, w in row.items()))
            row = {k: row[k] for k in keys}
            if (best is None or len(covers(row) & wanted) > len(covers(best) & wanted)) and not refused_with(row):
                best = row
        if best is None:
            raise SystemExit(f"error: no accepted case covers {sorted(wanted, key=repr)[:3]}")
        rows.append(best)
        wanted -= covers(best)
    return rows


def full_product(options: dict[str, list[Any]], only: list[str]) -> list[Case]:
    """Every combination of the `only` options' values (all options if empty), the others at
    their first value."""
    keys = only or list(options)
    unknown = [k for k in keys if k not in options]
    if unknown:
        raise SystemExit(f"error: --only {', '.join(unknown)}: not an option here ({', '.join(options)})")
    rows = itertools.product(*(options[k] for k in keys))
    return [Case({**{k: v[0] for k, v in options.items()}, **dict(zip(keys, row))}) for row in rows]


def small_dataset(src: Path, out: Path) -> Path:
    """The cases' dataset: 8 images a class of an ImageFolder tree (the demo digits), both
    formats, in shards of 40; returns its root."""
    from lsa_dist.data.convert import ConvertOptions, convert

    if not (out / "dataset.json").is_file():
        convert(src, out, "both", options=ConvertOptions(samples_per_shard=40, limit_per_class=8), workers=1)
    return out


def init_file(out: Path) -> Path:
    """A model file of the cases' model, from another seed, for model.init_from."""
    import torch

    from lsa_dist.config import load_config, model_overrides
    from lsa_dist.models import create_model
    from lsa_dist.weights import save_model_file

    path = out / "init" / "model.pt"
    if not path.is_file():
        cfg = load_config(CONFIG, BASE)
        torch.manual_seed(1)
        model = create_model(cfg.model.name, None, **model_overrides(cfg, num_classes=10))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model_file(path, dict(model.cfg.__dict__), model.state_dict())
    return path


def train_here(args: list[str]) -> str:
    """One run in this process (rank 0 of 1): 'finished', 'stopped' or the error's last line."""
    import traceback

    from lsa_dist.config import load_config
    from lsa_dist.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(load_config(CONFIG, args))
        return trainer.fit().status
    except Exception:  # noqa: BLE001 - a failing case is a result
        return traceback.format_exc().strip().splitlines()[-1]
    finally:
        if trainer is not None and trainer.lock is not None:
            trainer.lock.release()


def train_launched(args: list[str], ranks: int, log: Path) -> str:
    """One run through launch/local.py: 'finished', or its exit code and last error line."""
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(CONFIG), "--nproc", str(ranks), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    # dynamo gave a function up to eager: the case compiled less than it says
    if RECOMPILE_LIMIT in proc.stdout + proc.stderr:
        return f"exit {proc.returncode}: torch._dynamo {RECOMPILE_LIMIT}"
    if proc.returncode == 0:
        return "finished"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return f"exit {proc.returncode}: {lines[-1] if lines else ''}"


def run_case(case: Case, setting: Setting) -> None:
    """Stopped at STOP and resumed by the same command; then compared with the uninterrupted
    run's weights, or on FFCV (its compiled decoder draws the crops unseeded, so no two FFCV
    runs are equal) checked to have trained every step once, in order."""
    start, exact = time.time(), case.values.get("data.format") != "ffcv"
    for run in (case.name, f"{case.name}-ref"):  # what a cut-off earlier attempt left would be resumed
        shutil.rmtree(setting.out / run, ignore_errors=True)
    runs = [(case.name, [f"train.max_steps={STOP}"]), (case.name, [])]
    for run, extra in ([(f"{case.name}-ref", [])] if exact else []) + runs:
        args = overrides(case, setting, run) + extra
        if case.ranks == 1:
            status = train_here(args)
        else:
            status = train_launched(args, case.ranks, setting.out / f"{run}.log")
        if status != "finished":
            case.outcome, case.detail = "failed", f"{run}{' (to step ' + str(STOP) + ')' if extra else ''}: {status}"
            case.seconds = round(time.time() - start, 1)
            return
    case.seconds = round(time.time() - start, 1)
    if not exact:
        rows = (setting.out / case.name / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in rows if '"train/loss"' in line]
        once = steps == list(range(1, len(steps) + 1)) and len(steps) > STOP
        case.outcome = "resumed, steps once" if once else "failed"
        case.detail = "" if once else f"steps logged after the resume: {steps}"
        return
    same = total = 0
    files = ["model.pt"] + (["model_ema.pt"] if case.values.get("optim.ema_decay") else [])
    for name in files:
        s, t = compare(setting.out / f"{case.name}-ref" / name, setting.out / case.name / name)
        same, total = same + s, total + t
    case.identical = f"{same}/{total}"
    case.outcome = "resumed exactly" if same == total else "failed"
    case.detail = "" if same == total else f"{total - same} of {total} tensors differ after the resume"


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


def run_cases(cases: list[Case], setting: Setting, progress: bool = True, resume: bool = False) -> list[Case]:
    """Refused cases are checked here; one-rank cases run in one worker process (this tool with
    --worker), two-rank ones through the launcher at the same time. Fills in each case's outcome. Every result is
    appended to results.jsonl in the output folder as soon as it is known; with `resume`, the
    cases found there keep their result and are not run again (an interrupted long run)."""
    results = setting.out / "results.jsonl"
    if not resume:
        results.unlink(missing_ok=True)
    for case in cases:
        case.detail = refusal(case, setting)
        case.outcome = "refused" if case.detail else ""

    def load() -> None:
        done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
        found = {_key(r["values"]): r for r in done}
        for case in cases:
            if not case.outcome and _key(case.values) in found:
                for key in ("outcome", "detail", "identical", "seconds"):
                    setattr(case, key, found[_key(case.values)][key])

    load()
    local = [c for c in cases if not c.outcome and c.ranks == 1]
    worker = None
    if local:  # the one-rank cases run beside the launched ones: each leaves the other idle cores
        job = setting.out / "worker-cases.json"
        job.write_text(
            json.dumps(
                {
                    "setting": {k: str(v) for k, v in asdict(setting).items() if k != "extra"}
                    | {"extra": setting.extra},
                    "cases": [c.values for c in local],
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--worker", str(job)]
        with (setting.out / "worker.log").open("w") as log:  # the runs' own output
            worker = subprocess.Popen(cmd, env=env, stdout=None if progress else subprocess.DEVNULL, stderr=log)
    try:
        for i, case in enumerate(c for c in cases if not c.outcome and c.ranks > 1):
            run_case(case, setting)
            with results.open("a") as out:
                out.write(json.dumps(asdict(case)) + "\n")
            if progress:
                print(f"two-rank case {i + 1}: {case.name}: {case.outcome} {case.detail}", flush=True)
    except BaseException:
        if worker is not None:
            worker.kill()
        raise
    if worker is not None:
        worker.wait()
        load()
        for case in (c for c in local if not c.outcome):
            tail = ((setting.out / "worker.log").read_text().strip().splitlines() or [""])[-1]
            case.outcome, case.detail = "failed", f"the worker process ended (exit {worker.returncode}): {tail}"
    return cases


def worker(job_file: Path) -> int:
    """--worker: the one-rank cases of `job_file`, one after another in this process; each
    result appended to results.jsonl beside it as soon as it is known."""
    from lsa_dist.dist import free_port

    job = json.loads(job_file.read_text())
    s = job["setting"]
    setting = Setting(Path(s["data"]), Path(s["init_file"]), Path(s["out"]), list(s["extra"]))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    progress = os.fdopen(os.dup(1), "w")  # the runs print on stdout too: theirs goes to stderr (worker.log)
    os.dup2(2, 1)
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True  # not a silent fall-back to eager
    with (job_file.parent / "results.jsonl").open("a") as results:
        for values in job["cases"]:
            case = Case(values)
            run_case(case, setting)
            torch._dynamo.reset()  # each case compiles as a fresh process would (and no recompile limit is reached)
            results.write(json.dumps(asdict(case)) + "\n")
            results.flush()
            print(f"one-rank case: {case.name}: {case.outcome} {case.detail}", file=progress, flush=True)
    return 0


def table(cases: list[Case]) -> str:
    keys = list(cases[0].values) if cases else []
    short = {k: k.split(".")[-1][:10] for k in keys}
    head = " ".join(f"{short[k]:>10}" for k in keys) + f" {'outcome':16} {'weights':>8} {'s':>6}  detail"
    lines = [head]
    for c in cases:
        cells = " ".join(f"{str(c.values[k]):>10}" for k in keys)
        lines.append(f"{cells} {c.outcome:16} {c.identical:>8} {c.seconds:>6}  {c.detail}")
    return "\n".join(lines)


def covered_pairs(cases: list[Case]) -> set[tuple]:
    """The (option, value, option, value) pairs the trained cases cover."""
    out = set()
    for case in cases:
        if case.outcome.startswith("resumed"):
            items = sorted(case.values.items())
            out |= {(a, va, b, vb) for (a, va), (b, vb) in itertools.combinations(items, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="the full product, not the pairwise cases")
    parser.add_argument("--only", nargs="+", default=[], metavar="KEY", help="with --all: vary only these options")
    parser.add_argument(
        "--data", type=Path, default=None, help="a converted dataset (default: made from the demo digits)"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--resume", action="store_true", help="with --out: keep the results an interrupted run left there, run the rest"
    )
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every case")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.only and not args.all:
        parser.error("--only goes with --all")
    if args.resume and not args.out:
        parser.error("--resume needs --out: the folder of the interrupted run")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="lsa-combinations-") as tmp:
        out = (args.out or Path(tmp)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        data = args.data
        if data is None:
            from make_demo_dataset import make_demo_dataset

            if not (out / "data" / "dataset.json").is_file():
                make_demo_dataset(out / "digits")
            data = small_dataset(out / "digits", out / "data")
        setting = Setting(data.resolve(), init_file(out), out, list(args.overrides))
        cases = full_product(OPTIONS, args.only) if args.all else pairwise(OPTIONS, setting)
        print(f"{len(cases)} cases; the runs in {out}", flush=True)
        run_cases(cases, setting, resume=args.resume)
    print("\n" + table(cases))
    outcomes = ("resumed exactly", "resumed, steps once", "refused", "failed")
    counts = {k: sum(c.outcome == k for c in cases) for k in outcomes}
    print(f"\n{len(cases)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()), end="")
    print(f"; {len(covered_pairs(cases))} pairs of values trained; {(time.time() - started) / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cases], indent=1) + "\n")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
