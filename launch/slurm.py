#!/usr/bin/env python
"""Train on a SLURM cluster through submitit.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --config configs/lsa_large.yaml [key=value ...]

Validates the config (and, where they are reachable, the dataset and the partition) before
submitting, prepares the MLflow run, submits, and prints the job id, the log paths, the
MLflow run and the command to follow the logs. `--wait` blocks until the job ends and exits
with its status; `--dry-run` prints the resolved config and the sbatch script and submits
nothing (no cluster needed).

Inside the job, every task takes its rank, local rank, world size and master address from
submitit (nodes are told apart by SLURM, not by hostname) and calls lsa_dist.train.main.
Before a preemption or the time limit SLURM signals the job (USR2): the ranks finish the
step, save a checkpoint together, rank 0 hands over to submitit's checkpoint/requeue
(TrainJob.checkpoint), and the requeued job resumes from that checkpoint into the same
MLflow run.

Cluster defaults: launch.slurm.* in the config, overridden by LSA_SLURM_PARTITION,
LSA_SLURM_ACCOUNT, LSA_SLURM_QOS and LSA_SLURM_CONSTRAINT, overridden by the flags.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist import cli  # noqa: E402
from lsa_dist.config import ConfigError, RunConfig, redacted_yaml  # noqa: E402
from lsa_dist.jobs import TrainJob  # noqa: E402
from lsa_dist.lock import RunLock, squeue_states  # noqa: E402
from lsa_dist.log import setup_logging  # noqa: E402
from lsa_dist.redact import redact_output  # noqa: E402
from lsa_dist.resume import take_lineage  # noqa: E402
from lsa_dist.tracking import end_run  # noqa: E402

logger = logging.getLogger("lsa_dist.launch.slurm")  # under the library's logger: one setup shows both


def slurm_defaults(cfg: RunConfig) -> dict[str, Any]:
    """launch.slurm.* of the config; LSA_SLURM_PARTITION, _ACCOUNT, _QOS, _CONSTRAINT override
    the placement (a site's defaults, set once in a shell profile)."""
    s = cfg.launch.slurm
    values: dict[str, Any] = {
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
        "time_min": s.time_min,
        "gpus_per_node": s.gpus_per_node,
        "cpus_per_task": s.cpus_per_task,
        "mem_gb": s.mem_gb,
        "mem_per_gpu_gb": s.mem_per_gpu_gb,
        "exclusive": s.exclusive,
        "job_name": s.job_name,
        "additional": dict(s.additional),
        "setup": [f"export {key}={shlex.quote(str(value))}" for key, value in s.env.items()] + list(s.setup),
        "array_parallelism": s.array_parallelism,
    }
    for key in ("partition", "account", "qos", "constraint"):
        values[key] = os.environ.get(f"LSA_SLURM_{key.upper()}", values[key])
    return values


def executor_parameters(args: argparse.Namespace, cfg: RunConfig) -> dict[str, Any]:
    """submitit's SLURM parameters from flags > environment > config."""
    d = slurm_defaults(cfg)

    def pick(flag: Any, key: str) -> Any:
        return flag if flag not in (None, "") else d[key]

    gpus = pick(args.gpus_per_node, "gpus_per_node")
    params: dict[str, Any] = {
        "nodes": args.nodes or cfg.launch.nodes,
        "tasks_per_node": args.tasks_per_node or max(1, gpus),
        "cpus_per_task": pick(args.cpus_per_task, "cpus_per_task"),
        "timeout_min": pick(args.time, "time_min"),
        "name": args.job_name or d["job_name"] or f"lsa-{cfg.train.name}",
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_srun_args": ["--kill-on-bad-exit=1"],  # one failed task ends the job
        "slurm_additional_parameters": {k.replace("_", "-"): v for k, v in d["additional"].items()},
    }
    if d["setup"]:
        params["slurm_setup"] = d["setup"]
    if gpus:
        params["gpus_per_node"] = gpus
    mem = pick(args.mem_gb, "mem_gb") or gpus * d["mem_per_gpu_gb"]  # without GPUs: SLURM's default
    if mem:
        params["mem_gb"] = mem
    parallel = pick(args.array_parallelism, "array_parallelism")
    if parallel:
        params["slurm_array_parallelism"] = parallel
    for key, flag in (
        ("partition", args.partition),
        ("account", args.account),
        ("qos", args.qos),
        ("constraint", args.constraint),
    ):
        value = pick(flag, key)
        if value:
            params[f"slurm_{key}"] = value
    if args.exclusive or d["exclusive"]:
        params["slurm_exclusive"] = True
    return params


def check_partition(name: str) -> None:
    """Fail before submitting if SLURM does not know the partition."""
    if not shutil.which("sinfo"):
        raise SystemExit("error: sinfo not found: this machine is not a SLURM submit host (use --dry-run to inspect)")
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "sinfo failed"
        raise SystemExit(f"error: cannot reach the SLURM controller: {why}")
    known = sorted(set(out.stdout.split()))
    if name and name not in known:
        raise SystemExit(f"error: unknown partition {name!r}; this cluster has: {', '.join(known)}")


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """--sweep optim.lr=1e-3,5e-4 --sweep model.drop_path_rate=0,0.1 -> the grid of overrides."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not values:
            raise SystemExit(f"error: --sweep {sweep!r} is not key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def make_executor(folder: Path, params: dict[str, Any]):  # noqa: ANN201 - submitit.AutoExecutor
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=1000)
    executor.update_parameters(**params)
    return executor


def build_parser() -> argparse.ArgumentParser:
    parser = cli.config_parser(__doc__)
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: launch.nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="one task per GPU; 0: one task per node")
    parser.add_argument(
        "--tasks-per-node", type=int, default=None, help="tasks per node (default: GPUs per node, or 1)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument("--time", type=int, default=None, help="time limit in minutes")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--job-dir", type=Path, default=None, help="submitit folder (default RUN/slurm/<job id>)")
    parser.add_argument("--exclusive", action="store_true")
    parser.add_argument(
        "--signal-delay", type=int, default=90, help="seconds between the USR2 signal and the time limit"
    )
    parser.add_argument(
        "--sweep", action="append", default=[], help="key=v1,v2: one run per value (grids multiply), as one job array"
    )
    parser.add_argument("--array-parallelism", type=int, default=None, help="a sweep's runs at once (default: all)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and sbatch script; submit nothing"
    )
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    return parser


def load_jobs(args: argparse.Namespace) -> list[RunConfig]:
    """One config per point of the --sweep grid (the base config alone without one); each
    point is its own run: train.name gets the point's values."""
    base = cli.load(args)
    jobs = []
    for point in sweep_points(args.sweep):
        name = [f"train.name={base.train.name}-" + "-".join(p.split("=", 1)[1] for p in point)] if point else []
        jobs.append(cli.load(args, *point, *name))
    return jobs


# distributed variables a shell may hold (an earlier torchrun, a login node's job): sbatch passes
# the submitting environment to every task, where they would contradict SLURM's
INHERITED = (
    "LSA_RESTART_COUNT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def clear_inherited() -> list[str]:
    """Remove INHERITED and TORCHELASTIC_* from this process's environment (what the job gets)."""
    found = sorted(k for k in os.environ if k in INHERITED or k.startswith("TORCHELASTIC_"))
    for key in found:
        del os.environ[key]
    return found


def snapshot_code(output_dir: Path) -> Path:
    """A copy of lsa_dist/ that the job imports (PYTHONPATH): edits to the checkout after the
    submission, or between a job's requeues, do not change what a queued job runs."""
    base = output_dir.resolve() / ".slurm_code" / time.strftime("%Y%m%d-%H%M%S")
    target, n = base, 0
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    shutil.copytree(ROOT / "lsa_dist", target / "lsa_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def dry_run(jobs: list[RunConfig], params: dict[str, Any], job_dir: Path | None) -> int:
    """Print the resolved config and the sbatch script submitit would submit (a sweep: one array)."""
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = jobs[0]
    print("# resolved config (secrets redacted)\n" + redacted_yaml(cfg))
    sbatch = {k[len("slurm_") :] if k.startswith("slurm_") else k: v for k, v in params.items()}
    sbatch["ntasks_per_node"] = sbatch.pop("tasks_per_node")
    sbatch["time"] = sbatch.pop("timeout_min")
    sbatch["job_name"] = sbatch.pop("name")
    if "mem_gb" in sbatch:
        sbatch["mem"] = f"{sbatch.pop('mem_gb')}GB"
    folder = job_folder(jobs, job_dir)
    if len(jobs) > 1:
        sbatch["map_count"] = len(jobs)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    print("# sbatch script (submitit)\n" + _make_sbatch_string(command=command, folder=folder, **sbatch))
    world = params["nodes"] * params["tasks_per_node"]
    runs = f"{len(jobs)} runs as one job array ({', '.join(c.train.name for c in jobs)}); " if len(jobs) > 1 else ""
    print(f"# {params['nodes']} nodes x {params['tasks_per_node']} tasks = {world} ranks; {runs}nothing submitted")
    inherited = [k for k in os.environ if k in INHERITED or k.startswith("TORCHELASTIC_")]
    if inherited:
        print(f"# not passed to the job (left in this shell by another launcher): {', '.join(sorted(inherited))}")
    print(f"# the job imports a copy of lsa_dist/ made at submission, in {Path(cfg.train.output_dir) / '.slurm_code'}/")
    return 0


def job_folder(jobs: list[RunConfig], job_dir: Path | None) -> Path:
    """submitit's folder: RUN/slurm/<job id> for one run, OUTPUT/sweeps/<time>/<job>_<task> for an array."""
    if job_dir:
        return job_dir
    if len(jobs) == 1:
        return jobs[0].run_dir.resolve() / "slurm" / "%j"
    return Path(jobs[0].train.output_dir).resolve() / "sweeps" / time.strftime("%Y%m%d-%H%M%S") / "%j"


def private_folder(folder: Path) -> Path:
    """Create submitit's folder for `folder` (its part before the first %j) owner-only (0700)
    before submitit writes into it: the sbatch script it keeps there holds launch.slurm.setup's
    lines, which may export a credential (export HF_TOKEN=...). Returns that folder."""
    from submitit.core.utils import JobPaths

    base = JobPaths.get_first_id_independent_folder(folder)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    base.chmod(0o700)
    return base


def make_private(base: Path) -> None:
    """submitit's folder after a submission: the folders in it 0700 (a job's, an array's, where
    its one sbatch script goes) and the files (the script, the pickled jobs) 0600; symbolic
    links (submitit's pointers to the script) are left alone."""
    base.chmod(0o700)
    for path in base.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def submit(jobs: list[RunConfig], previous: list[str], params: dict[str, Any], job_dir: Path | None) -> list:
    """Write each run's config, prepare its MLflow run, submit them (several: one job array) and
    say where to look; submitit's folders and files are the owner's only. Returns (config, job,
    MLflow run id) per run."""
    prepared = [cli.prepare_run(cfg, prev, "slurm_config.yaml") for cfg, prev in zip(jobs, previous)]
    folder = job_folder(jobs, job_dir)
    base = private_folder(folder)
    executor = make_executor(folder, params)
    if len(jobs) == 1:
        submitted = [executor.submit(TrainJob(str(prepared[0][0]), prepared[0][1]))]
    else:
        with executor.batch():
            submitted = [executor.submit(TrainJob(str(path), run_id)) for path, run_id in prepared]
    make_private(base)
    out = []
    for cfg, job, (_, run_id) in zip(jobs, submitted, prepared):
        stdout = job.paths.stdout
        shape = f"{params['nodes']} nodes x {params['tasks_per_node']} tasks"
        print(f"submitted job {job.job_id}: {cfg.train.name}, {shape}")
        print(f"  logs:   {stdout} (rank 0), {job.paths.folder} (all tasks)")
        print(f"  follow: tail -f {stdout}")
        print(f"  MLflow run {run_id or 'off'}; run folder {cfg.run_dir.resolve()}")
        out.append((cfg, job, run_id))
    return out


def check_time(time_min: int, signal_delay_s: int, startup_s: int) -> None:
    """ConfigError unless the time limit leaves the job its start-up before the USR2 warning:
    a job warned while it starts checkpoints nothing new and is requeued to start again, on
    and on."""
    if signal_delay_s < 1:
        raise ConfigError(
            f"--signal-delay {signal_delay_s}: the job must be warned (USR2) at least 1 s before its limit"
        )
    room = time_min * 60 - signal_delay_s
    if room < startup_s:
        raise ConfigError(
            f"--time {time_min} min with --signal-delay {signal_delay_s} s warns the job {room} s after it starts, "
            f"before its start-up (launch.slurm.startup_s={startup_s}) is through: it would requeue without "
            f"training; give --time at least {-(-(startup_s + signal_delay_s) // 60)} min"
        )


def main(argv: list[str] | None = None) -> int:
    redact_output()
    setup_logging(0)
    args = build_parser().parse_args(argv)
    try:
        jobs = load_jobs(args)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    cfg = jobs[0]
    params = executor_parameters(args, cfg)
    try:
        check_time(params["timeout_min"], args.signal_delay, cfg.launch.slurm.startup_s)
    except ConfigError as err:
        return cli.fail(err)
    if args.dry_run:
        return dry_run(jobs, params, args.job_dir)
    check_partition(params.get("slurm_partition", ""))
    world = params["nodes"] * params["tasks_per_node"]
    try:  # every job of a sweep is checked before any is submitted
        # the dataset where this host sees it; the job's nodes (not this host) must support the precision
        locks = [RunLock(cfg.run_dir, "launch/slurm.py") for cfg in jobs]
        for lock in locks:
            lock.check_free()  # a run in use is refused as such, before its config is looked at
        plans = [cli.preflight(cfg, world, dataset=dataset_visible(cfg), hardware=False) for cfg in jobs]
        locks = [lock.acquire() for lock in locks]
        for cfg, plan in zip(jobs, plans):  # before the job can start: no requeue sees the lineage left
            take_lineage(plan, cfg.run_dir)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    previous = [plan.run_id for plan in plans]
    # jobs inherit this environment (sbatch --export=ALL): a copy of the code, and no distributed
    # variables of another launcher
    cleared = clear_inherited()
    if cleared:
        logger.info(f"not passing {', '.join(cleared)} (left in this shell) to the job")
    code = snapshot_code(Path(jobs[0].train.output_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH", "")]))
    submitted = submit(jobs, previous, params, args.job_dir)
    for (_, job, _), lock in zip(submitted, locks):
        lock.record({"slurm_job": str(job.job_id)})  # the job owns the run from now until it leaves the queue
        lock.release()
    return wait(submitted) if args.wait else 0


def dataset_visible(cfg: RunConfig) -> bool:
    """Whether this host can check the dataset: a relative root, or an absolute one mounted here."""
    root = Path(cfg.data.root)
    return root.is_dir() or not root.is_absolute()


def wait_until_gone(job_id: str, poll_s: float = 2.0) -> None:
    """Block while the job is in SLURM's queue. A preempted or timed-out job goes back to
    PENDING after its requeue, which submitit's own watcher may take for the end."""
    misses = 0
    while misses < 3:  # three empty answers in a row: not a passing hiccup of the controller
        misses = misses + 1 if squeue_states(job_id) == set() else 0
        time.sleep(poll_s)


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*:|^srun: error|^error:|Killed|CANCELLED")


def task_errors(job: Any, task: int) -> list[str]:
    """The lines that say why a task failed: its final exception and SLURM's own messages."""
    try:
        text = job.task(task).stderr() or ""
    except Exception:  # noqa: BLE001 - a task that never started has no log
        return []
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line).rstrip() for line in text.splitlines()]
    found = [line for line in lines if EXCEPTION_LINE.search(line) and "submitit" not in line]
    exceptions = [line for line in found if not line.startswith(("srun", "slurmstepd"))]
    return ([exceptions[-1]] if exceptions else []) + [
        line for line in found if line.startswith(("srun", "slurmstepd"))
    ]


def wait(submitted: list) -> int:
    """Block until every job ends; show each failure with the failing task's error."""
    code = 0
    start = time.time()
    for cfg, job, run_id in submitted:
        wait_until_gone(job.job_id)
        try:
            result = job.results()[0]  # task 0 (rank 0) speaks for the job
        except Exception as err:  # noqa: BLE001 - submitit raises several types for failed jobs
            code = 1
            # a job cancelled while pending, or whose rank 0 was killed, left its run RUNNING
            end_run(cfg, run_id, "KILLED" if "CANCELLED" in str(err) else "FAILED")
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(
                f"job {job.job_id} ({cfg.train.name}) failed after {time.time() - start:.0f} s: {first}",
                file=sys.stderr,
            )
            for task in range(job.num_tasks):
                for line in task_errors(job, task):
                    print(f"  task {task}: {line}", file=sys.stderr)
            print(f"  all logs: {job.paths.folder}", file=sys.stderr)
            continue
        metrics = result.get("metrics", {})
        top1 = metrics.get("val/top1")
        shown = f"val top-1 {top1:.2f}%" if top1 is not None else "no eval"
        print(f"job {job.job_id} ({cfg.train.name}) {result['status']}: {shown}; checkpoint {result['checkpoint']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
