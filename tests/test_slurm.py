"""launch/slurm.py against a real SLURM 22.05 cluster (munged, slurmdbd + MariaDB, slurmctld,
4 slurmd's emulating nodes n1..n4 on this machine), started by tools/slurm_cluster.sh."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, run_local

from lsa_dist.weights import load_model_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The cluster's environment; started here unless it already runs (CI starts it)."""
    script = ROOT / "tools" / "slurm_cluster.sh"
    was_running = (
        subprocess.run([str(script), "status"], capture_output=True, text=True).stdout.count("running (pid") >= 4
    )
    proc = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ)
    conf = (
        subprocess.run([str(script), "env"], capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
    )
    env["SLURM_CONF"] = conf
    yield env
    if not was_running:
        subprocess.run([str(script), "stop"], capture_output=True, timeout=120)


@pytest.fixture(autouse=True)
def no_leftover_jobs(request: pytest.FixtureRequest) -> None:
    """A failed test must not leave jobs that hold the emulated nodes for the next one."""
    yield
    if "cluster" in request.fixturenames:
        env = request.getfixturevalue("cluster")
        subprocess.run(["scancel", "-u", getpass.getuser()], env=env, capture_output=True)


def slurm(env: dict, tmp: Path, name: str, data: Path, *args: str, background: bool = False, timeout: int = 900):
    """`launch/slurm.py --wait` with flags and key=value overrides in `args` (overrides win over
    TINY); with `background`, the running launcher (a Popen) instead of its result."""
    flags = [a for a in args if "=" not in a or a.startswith("--")]
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    cmd = [sys.executable, str(ROOT / "launch" / "slurm.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *flags]
    cmd += [f"data.root={data}", f"train.output_dir={tmp}", f"train.name={name}", *TINY, *overrides]
    cmd += [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    cmd.append("--wait")
    if not background:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)


def local(tmp: Path, name: str, data: Path, nproc: int, *args: str) -> None:
    proc = run_local(tmp, name, data, "tracking.enabled=false", *args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_model_file(a / "model.pt").state_dict(), load_model_file(b / "model.pt").state_dict()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def mlflow_runs(tmp: Path, name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lsa_demo")
    return client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")


def dry_run(*args: str, **env: str) -> str:
    """launch/slurm.py --dry-run of lsa_large.yaml on 4 nodes x 8 GPUs, with no SLURM at hand
    (no SLURM_CONF, no sbatch on PATH) and `env` added; its output."""
    environ = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    environ["PATH"] = os.pathsep.join(p for p in environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists())
    cmd = [sys.executable, str(ROOT / "launch" / "slurm.py"), "--config", str(ROOT / "configs" / "lsa_large.yaml")]
    cmd += ["--nodes", "4", "--gpus-per-node", "8", "--dry-run", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_prints_the_sbatch_script_without_a_cluster(tmp_path: Path) -> None:
    out = dry_run("--partition", "gpu", f"train.output_dir={tmp_path}")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --cpus-per-task=10",
    ):
        assert line in out, line
    assert "srun" in out and "--kill-on-bad-exit=1" in out and "submitit.core._submit" in out
    assert "zero_stage: 2" in out and "4 nodes x 8 tasks = 32 ranks; nothing submitted" in out
    assert not (tmp_path / "lsa_large").exists()


def test_dry_run_shows_extra_directives_setup_lines_memory_and_a_sweep_as_an_array(tmp_path: Path) -> None:
    """launch.slurm.additional and .setup, memory per GPU by default, a sweep as one array
    throttled by --array-parallelism; distributed variables left in the shell are reported and
    not passed on (they made submitit raise), and the code copy is announced."""
    args = ["--sweep", "optim.lr=1e-3,5e-4,2e-4", "--array-parallelism", "2", f"train.output_dir={tmp_path}"]
    args += [
        "launch.slurm.additional.mail_type=END",
        "launch.slurm.setup=[module load cuda/12.4,source /opt/venv/bin/activate]",
        "launch.slurm.env.NCCL_SOCKET_IFNAME=ib0",
        "launch.slurm.env.NCCL_IB_HCA='mlx5_0 mlx5_1'",
    ]
    out = dry_run(*args, RANK="3", MASTER_PORT="29400", TORCHELASTIC_RUN_ID="x")
    for line in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --mail-type=END",
        "#SBATCH --mem=512GB",
        "#SBATCH --gpus-per-node=8",
    ):
        assert line in out, line
    script = out[out.index("#!/bin/bash") :]  # after the resolved config, which lists them too
    setup = script.index("module load cuda/12.4")
    assert setup < script.index("source /opt/venv/bin/activate") < script.index("srun ")
    # launch.slurm.env: exported for every task before the setup lines, quoted for the shell
    assert script.index("export NCCL_SOCKET_IFNAME=ib0") < script.index("export NCCL_IB_HCA='mlx5_0 mlx5_1'") < setup
    assert "3 runs as one job array (lsa_large-1e-3, lsa_large-5e-4, lsa_large-2e-4)" in out
    assert (
        "not passed to the job (left in this shell by another launcher): MASTER_PORT, RANK, TORCHELASTIC_RUN_ID" in out
    )
    assert "the job imports a copy of lsa_dist/ made at submission" in out
    assert {p.name for p in tmp_path.iterdir()} == {"mlflow.db"}  # nothing written (the database was there)


def test_a_time_limit_that_leaves_no_room_for_start_up_is_refused(tmp_path: Path) -> None:
    """--time 2 with the default 90 s warning leaves 30 s, less than launch.slurm.startup_s (60):
    refused in one line before anything is submitted, with the --time that would do."""
    cmd = [sys.executable, str(ROOT / "launch" / "slurm.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    cmd += ["--time", "2", "--dry-run", f"train.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "warns the job 30 s after it starts" in proc.stderr and "give --time at least 3 min" in proc.stderr
    ok = subprocess.run([*cmd, "--signal-delay", "60"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_requeues_are_bounded_and_an_attempt_that_trained_nothing_is_not_requeued() -> None:
    from lsa_dist.jobs import requeue_refusal

    assert requeue_refusal(0, 20, step=40, first_step=0) == ""
    assert requeue_refusal(3, 20, step=90, first_step=40) == ""
    assert "requeued 20 times already (launch.slurm.max_requeues=20)" in requeue_refusal(20, 20, 90, 40)
    assert "trained no step before the warning (step 40)" in requeue_refusal(2, 20, step=40, first_step=40)
    assert requeue_refusal(0, 0, step=10, first_step=0).startswith("not requeued: requeued 0 times")


def test_bad_config_or_unknown_partition_submits_nothing(cluster: dict, demo_shards: Path, tmp_path: Path) -> None:
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=cluster).stdout
    proc = slurm(cluster, tmp_path, "bad", demo_shards, "--nodes", "2", "optim.lrr=1")
    assert proc.returncode == 2 and proc.stderr.startswith("error: optim.lrr: unknown key")
    proc = slurm(cluster, tmp_path, "bad", demo_shards, "--nodes", "2", "--partition", "nope")
    assert proc.returncode != 0 and "unknown partition 'nope'; this cluster has: batch, urgent" in proc.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=cluster).stdout
    assert before == after
    assert not (tmp_path / "bad" / "slurm").exists()


def test_the_cluster_script_keeps_its_secrets_and_signals_only_its_own_processes(cluster: dict, tmp_path: Path) -> None:
    """Owner-only secrets, MariaDB's root refused over TCP; and `stop` on a folder whose pid
    file names a process that is not one of its daemons (a reused pid) leaves that process alone."""
    slurm_dir = Path(cluster["SLURM_CONF"]).parents[1]
    for secret in ("munge/etc/munge.key", "etc/slurmdbd.conf", "etc/db.password"):
        assert (slurm_dir / secret).stat().st_mode & 0o077 == 0, secret
    assert "lsa-slurm-db" not in (slurm_dir / "etc" / "slurmdbd.conf").read_text()
    tcp_root = subprocess.run(
        ["mariadb", "-h", "127.0.0.1", "-P", "13306", "-uroot", "-e", "select 1"], capture_output=True, text=True
    )
    assert tcp_root.returncode != 0 and "Access denied" in tcp_root.stderr
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        other = tmp_path / "other-cluster"
        (other / "run").mkdir(parents=True)
        (other / "run" / "slurmctld.pid").write_text(str(bystander.pid))
        env = {**os.environ, "LSA_SLURM_DIR": str(other)}
        proc = subprocess.run(
            [str(ROOT / "tools" / "slurm_cluster.sh"), "stop"], env=env, capture_output=True, timeout=60
        )
        assert proc.returncode == 0 and bystander.poll() is None  # not ours: not signalled
    finally:
        bystander.kill()


@pytest.mark.parametrize("nodes,tasks", [(2, 2)], ids=["2x2"])  # several nodes, several tasks on each
def test_multi_node_job_matches_the_local_run(
    cluster: dict, demo_shards: Path, tmp_path: Path, nodes: int, tasks: int
) -> None:
    steps = ("train.max_steps=12", "data.batch_size=8")
    args = ("--nodes", str(nodes), "--tasks-per-node", str(tasks), "--cpus-per-task", "1", "--time", "30")
    start = time.time()
    proc = slurm(cluster, tmp_path, "cluster", demo_shards, *args, *steps, "launch.slurm.setup=['export A_TOKEN=T0K']")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_owner_only(tmp_path / "cluster" / "slurm", "export A_TOKEN=T0K")
    assert "finished: val top-1" in proc.stdout
    local(tmp_path, "local", demo_shards, nodes * tasks, *steps)
    assert same_weights(tmp_path / "cluster", tmp_path / "local")
    runs = mlflow_runs(tmp_path, "cluster")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["data.batch_size"] == "8" and "val/top1" in runs[0].data.metrics
    assert runs[0].data.tags["sys.world_size"] == str(nodes * tasks) and runs[0].data.tags["sys.slurm_job_id"]
    rows = [json.loads(line) for line in (tmp_path / "cluster" / "metrics.jsonl").read_text().splitlines()]
    print(f"{nodes} nodes x {tasks} tasks: submission to first step {rows[0]['time'] - start:.1f} s")
    if nodes == 2:  # the run goes on with another node count: 4 ranks' checkpoint on 1 node x 2 tasks
        args = ("--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30")
        proc = slurm(cluster, tmp_path, "cluster", demo_shards, *args, "train.max_steps=20", "data.batch_size=8")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "resuming" in proc.stdout and "written by 4 ranks) on 2 ranks" in proc.stdout
        (run,) = mlflow_runs(tmp_path, "cluster")
        assert run.info.status == "FINISHED" and run.data.tags["sys.world_size"] == "2"
        from mlflow import MlflowClient

        history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 21))


def test_a_sweep_runs_as_one_throttled_array_on_a_copy_of_the_code(
    cluster: dict, demo_shards: Path, tmp_path: Path
) -> None:
    """Two runs of a sweep as one job array, one at a time; each its own run folder and MLflow
    run, and each imports the copy of lsa_dist/ made at submission, not the checkout."""
    args = ("--nodes", "1", "--cpus-per-task", "1", "--time", "30", "--sweep=optim.lr=2e-3,1e-3")
    secret = "launch.slurm.setup=['export HF_TOKEN=S3CRET']"
    proc = slurm(cluster, tmp_path, "sweep", demo_shards, *args, "--array-parallelism=1", "train.max_steps=4", secret)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ids = re.findall(r"submitted job (\d+_\d+): sweep-", proc.stdout)
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0], proc.stdout  # one array, two tasks
    assert proc.stdout.count("finished: val top-1") == 2
    for name in ("sweep-2e-3", "sweep-1e-3"):
        (run,) = mlflow_runs(tmp_path, name)
        assert run.info.status == "FINISHED"
        logs = "".join(p.read_text() for p in (tmp_path / "sweeps").rglob("*_0_log.out"))
        assert f"{tmp_path}/.slurm_code/" in logs and f"lsa_dist from {ROOT}" not in logs
    assert_owner_only(tmp_path / "sweeps", "export HF_TOKEN=S3CRET")


def assert_owner_only(folder: Path, setup_line: str) -> None:
    """The sbatch script submitit keeps (with the launch.slurm.setup lines) is the owner's
    alone (0600), in folders that are too (0700): submitit's folder below `folder` and its own."""
    scripts = list(folder.rglob("*_submission.sh"))
    assert scripts and all(setup_line in p.read_text() for p in scripts)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in scripts)
    folders = [p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()]  # submitit's folders
    assert folders and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in folders)


# 176 bf16 steps (~0.3 s each here): a 2-minute allocation with --signal-delay 75 gets its USR2
# 45 s in, long before the run could end (it would have to step 2x as fast)
LONG_EPOCHS = 4
LONG = (f"optim.epochs={LONG_EPOCHS}", "checkpoint.every_steps=0", "engine.precision=bf16")
LONG_FLAGS = ("--nodes", "2", "--cpus-per-task", "1")  # one thread a task: two tasks on this host's two cores


@pytest.fixture(scope="module")
def uninterrupted(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the long run, never interrupted, on 2 local ranks of 1 thread each (a job
    of 2 nodes x 1 task with --cpus-per-task 1 gives the same weights)."""
    tmp = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_local(tmp, "reference", demo_shards, "tracking.enabled=false", *LONG, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "reference"


def wait_for_step(run: Path, step: int, timeout: float = 600) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists():
            rows = [line for line in metrics.read_text().splitlines() if '"train/loss"' in line]
            if rows and json.loads(rows[-1])["step"] >= step:
                return
        time.sleep(0.5)
    raise AssertionError(f"{run} did not reach step {step}")


def slow_requeue(env: dict, folder: Path) -> dict:
    """`env` with a `scontrol` first on PATH that runs the real one, and for `requeue` waits 2 s
    before and after it, as it may on a busy host. That widens, every time instead of by
    chance, the two windows in which the step can end around a requeueing rank 0: another
    rank exiting first (srun --kill-on-bad-exit ends the step before the request is made)
    and SLURM ending the step as soon as the requeue is accepted (before scontrol exits)."""
    real = shutil.which("scontrol", path=env["PATH"])
    assert real, "scontrol not on PATH"
    shim = folder / "bin" / "scontrol"
    shim.parent.mkdir(parents=True)
    pause = '[ "$1" = requeue ] && sleep 2'
    shim.write_text(f'#!/bin/sh\n{pause}\n"{real}" "$@"; rc=$?\n{pause}\nexit $rc\n')
    shim.chmod(0o755)
    return {**env, "PATH": f"{shim.parent}{os.pathsep}{env['PATH']}"}


def test_preemption_and_time_limit_checkpoint_requeue_and_finish_identically(
    cluster: dict, demo_shards: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """Preempted by an urgent job early in its first allocation, then cut by its 2-minute time
    limit (USR2 75 s before it) in the next: each time it checkpoints, requeues and continues from
    the run's own checkpoint (train.resume=never acts at the launch, not on every requeue), and it
    finishes with the uninterrupted run's weights, in one MLflow run."""
    env = slow_requeue(cluster, tmp_path)
    args = (*LONG_FLAGS, "--time", "2", "--signal-delay", "75", *LONG, "train.resume=never")
    args = (*args, "launch.slurm.startup_s=30")
    job = slurm(env, tmp_path, "preempted", demo_shards, *args, background=True)
    wait_for_step(tmp_path / "preempted", 5)
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-N", "4", "-c", "4", "-o", str(tmp_path / "urgent.out")]
        + ["--wrap", "sleep 5"],
        capture_output=True,
        text=True,
        env=cluster,
        check=True,
    ).stdout.strip()
    # the job owns its run, running or requeued: a second submission, or a local launch, is refused
    again = slurm(cluster, tmp_path, "preempted", demo_shards, *args)
    local_too = run_local(tmp_path, "preempted", demo_shards, *LONG, env=cluster)
    for proc in (again, local_too):
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert re.search(r"run folder \S+/preempted is in use by SLURM job \d+ \(host ", proc.stderr), proc.stderr
    out, err = job.communicate(timeout=1500)
    assert job.returncode == 0, out[-2000:] + err[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "preempted" / "slurm").rglob("*_0_log.out"))
    assert logs.count("stop requested (SIGUSR2)") >= 2 and logs.count("resumed from") >= 2, logs[-3000:]
    state = subprocess.run(
        ["sacct", "-n", "-X", "-j", urgent, "-o", "state"], capture_output=True, text=True, env=cluster
    ).stdout
    assert "COMPLETED" in state
    assert same_weights(tmp_path / "preempted", uninterrupted)
    runs = mlflow_runs(tmp_path, "preempted")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # continued, not duplicated
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(runs[0].info.run_id, "train/loss")
    assert max(m.step for m in history) == LONG_EPOCHS * (1438 // 32)


def _task_pids(run: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {run}/slurm/"], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_a_task_that_raises_ends_the_job_with_its_error(cluster: dict, demo_shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_shards, data)
    job = slurm(cluster, tmp_path, "raises", data, *LONG_FLAGS, "--time", "30", *LONG, background=True)
    wait_for_step(tmp_path / "raises", 5)
    for shard in (data / "wds").glob("train-*.tar"):  # the next shard any rank opens is unreadable
        shard.write_bytes(b"\0" * 100)
    broke = time.time()
    out, err = job.communicate(timeout=300)
    assert job.returncode == 1
    assert time.time() - broke < 60
    assert "failed" in err and "cannot read shard" in err and "DatasetError" in err


def test_a_task_killed_with_sigkill_ends_the_job(cluster: dict, demo_shards: Path, tmp_path: Path) -> None:
    job = slurm(cluster, tmp_path, "killed", demo_shards, *LONG_FLAGS, "--time", "30", *LONG, background=True)
    wait_for_step(tmp_path / "killed", 5)
    pids = _task_pids(tmp_path / "killed")
    assert len(pids) >= 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    killed = time.time()
    out, err = job.communicate(timeout=300)
    assert job.returncode == 1
    assert time.time() - killed < 60
    assert "failed" in err and ("Killed" in err or "signal" in err.lower())
    (run,) = mlflow_runs(tmp_path, "killed")
    assert run.info.status == "FAILED"  # not left RUNNING, whichever rank died
