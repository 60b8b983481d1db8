"""MLflow tracking: one run per training run, written by rank 0 only.

- The backend is tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite database in the
  project folder (sqlite:///<cwd>/mlflow.db; MLflow 3 refuses the old ./mlruns store).
- `prepare()` runs once before any worker starts (launchers call it): it creates the
  database and experiment (several processes creating a fresh sqlite schema at once crash)
  and decides the run: the one recorded in the run's latest checkpoint, or a new one.
- Metrics are queued and sent in batches from a background thread; if the server cannot be
  reached, a warning is printed once, metrics are appended to RUN/mlflow_pending.jsonl (at
  most SPOOL_MAX_BYTES) and replayed once when it comes back. Tracking never stops training.
- A server that is down at launch costs one bounded attempt (no retries, a 10 s timeout): the
  run id is then PENDING, rank 0 trains at once and creates (or continues) the run when the
  server answers, sending the params, tags and artifacts it held back and the spooled metrics.
- Runs end FINISHED, KILLED (stopped on request) or FAILED (crashed: by rank 0 on its way
  out, or by the local launcher when rank 0 died).
- Params are the flattened resolved config and the config artifact its YAML, both with secrets
  redacted (lsa_dist.redact: URL credentials, signed-URL parameters, secret-looking keys), as
  are the backend's address in messages; no environment variable is logged.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from .config import RunConfig, flatten
from .redact import first_line, redact_params, redact_text

RUN_ID_ENV = "LSA_MLFLOW_RUN_ID"
PENDING = "pending"  # the run is created by rank 0 once the server answers
SPOOL_NAME = "mlflow_pending.jsonl"
SPOOL_MAX_BYTES = 64 << 20  # metrics kept through an outage: about a million values


def tracking_uri(cfg: RunConfig) -> str:
    """The MLflow backend of this run, always absolute (workers may run elsewhere)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def _client(uri: str):  # noqa: ANN202 - mlflow.MlflowClient
    # an unreachable server must cost seconds, not MLflow's default minutes of retries
    # (a failed send is spooled and sent later, so retrying it here only delays training)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow prints "View run ... at: <tracking URI>" when a run ends: the URI may hold a password
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the database, not under the cwd of whoever logs
        artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def prepare(cfg: RunConfig, run_id: str = "") -> str:
    """Create database, experiment and (unless `run_id` continues one) the run; returns the run id.

    Returns "" when tracking is disabled and PENDING (with a warning) when the backend cannot be
    reached: the run is then created by rank 0's Tracker when it can be.
    """
    if not cfg.tracking.enabled:
        return ""
    uri = tracking_uri(cfg)
    try:
        return _open_run(cfg, uri, run_id)
    except Exception as err:  # noqa: BLE001
        print(
            f"warning: MLflow at {redact_text(uri)} is unreachable ({first_line(err)}); training starts now and "
            f"the run is created when the server answers (metrics wait in {cfg.run_dir / SPOOL_NAME})",
            file=sys.stderr,
        )
        return PENDING


def _open_run(cfg: RunConfig, uri: str, run_id: str) -> str:
    """Continue run `run_id` (marked RUNNING again) or create a new one; raises if unreachable."""
    client = _client(uri)
    experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
    if run_id and run_id != PENDING:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage != "deleted":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except Exception:  # noqa: BLE001 - a run id from another backend: start a new run
            warnings.warn(f"MLflow run {run_id} not found at {redact_text(uri)}; starting a new run", stacklevel=3)
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or cfg.train.name)
    return run.info.run_id


def end_run(cfg: RunConfig, run_id: str, status: str) -> None:
    """Mark a run ended from outside its workers (a launcher whose rank 0 died: SIGKILL, OOM),
    unless it already ended; tracking problems are ignored here."""
    if not (cfg.tracking.enabled and run_id) or run_id == PENDING:
        return
    try:
        client = _client(tracking_uri(cfg))
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception:  # noqa: BLE001, S110 - best effort: the run's metrics are already there or spooled
        pass


def run_id_for(cfg: RunConfig, previous: str) -> str:
    """The MLflow run a worker logs to: the one its launcher prepared ($LSA_MLFLOW_RUN_ID; PENDING
    if the server was down), else one prepared here (one process, or rank 0 under torchrun)."""
    return os.environ.get(RUN_ID_ENV) or prepare(cfg, previous)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def system_info(world_size: int, num_nodes: int, dataset_sha: str) -> dict[str, str]:
    import torch

    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "world_size": str(world_size),
        "nodes": str(num_nodes),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "git_commit": git_commit(),
        "dataset_json_sha256": dataset_sha,
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = "none"
    return info


class Tracker:
    """The rank-0 side of an MLflow run. All methods are safe to call when disabled.

    With run_id PENDING (the server was down at launch) the run is opened by the background
    thread once the server answers: `previous` (the checkpoint's run) is continued, else a new
    run is created; the calls made meanwhile are then replayed in order.
    """

    def __init__(
        self, cfg: RunConfig, run_id: str, spool: Path, flush_every_s: float = 5.0, previous: str = ""
    ) -> None:
        self.cfg = cfg
        self.enabled = bool(run_id)
        self.run_id = "" if run_id == PENDING else run_id
        self.previous = previous
        self.uri = tracking_uri(cfg)
        self.shown_uri = redact_text(self.uri)  # for messages: without credentials
        self.spool = spool
        self.warned = run_id == PENDING  # the launcher (or prepare here) has said so already
        self.dropped = 0  # metrics that did not fit in the spool
        self.held: list[Any] = []  # calls made before the run exists
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        self.flush_every_s = flush_every_s
        self.closed = threading.Event()
        self.thread = None
        if self.enabled:
            self.client = _client(self.uri)
            self.thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
            self.thread.start()

    # -- what training calls ------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Params not yet in the run (a continued run keeps its first values)."""
        if self.enabled:
            self._call(lambda: self._log_new_params(redact_params(params)))

    def _log_new_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])

    def log_config(self, cfg: RunConfig) -> None:
        self.log_params(flatten(cfg))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._call(lambda k=key, v=value: self.client.set_tag(self.run_id, k, v))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued; sent in batches by the background thread."""
        if self.enabled:
            stamp = int(time.time() * 1000)
            for key, value in metrics.items():
                self.queue.put((key, float(value), stamp, step))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def log_model(self, model: Any, name: str, register_as: str = "") -> None:
        """The exported model as an MLflow PyTorch model (optionally registered)."""
        if not self.enabled:
            return

        def log() -> None:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            try:
                with mlflow.start_run(run_id=self.run_id):
                    # pickle: MLflow's default (a traced pt2 graph) would fix the batch size
                    mlflow.pytorch.log_model(
                        model, name=name, registered_model_name=register_as or None, serialization_format="pickle"
                    )
            except Exception as err:  # noqa: BLE001 - the weights are in model.pt either way
                print(f"warning: the model was not logged to MLflow ({first_line(err)})", file=sys.stderr)

        self._call(log)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.closed.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        self._flush()
        if not self.run_id:
            print(
                f"warning: MLflow at {self.shown_uri} never answered: the run's metrics are kept in {self.spool}; "
                "run the same command again when it is back to send them",
                file=sys.stderr,
            )
            return
        self._call(lambda: self.client.set_terminated(self.run_id, status=status), always=True)

    # -- delivery -----------------------------------------------------------------------------
    def _call(self, fn: Any, always: bool = False) -> Any:
        """Run one MLflow call; after a failure (an outage) the next ones are skipped at once,
        not each paid with MLflow's retries, until a flush gets through again."""
        with self.lock:
            if not self.run_id:  # held until the run exists
                self.held.append(fn)
                return None
        if self.warned and not always:
            return None
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._warn(err)
            return None

    def _warn(self, err: BaseException) -> None:
        if not self.warned:
            self.warned = True
            print(
                f"warning: MLflow at {self.shown_uri} is unreachable ({first_line(err)}); metrics are kept in "
                f"{self.spool} and sent when it is back. Training continues.",
                file=sys.stderr,
            )

    def _worker(self) -> None:
        while not self.closed.wait(self.flush_every_s):
            self._flush()

    def _flush(self) -> None:
        """Send what was queued. While MLflow is unreachable it is appended to the spool (never
        rewritten, at most SPOOL_MAX_BYTES); the first send that works replays the spool once."""
        from mlflow.entities import Metric

        pending = []
        while True:
            try:
                pending.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if not self._opened():
            self._spool(pending)
            return
        if not pending and not (self.spool.is_file() and not self.warned):
            return
        try:
            if self.warned and self.spool.is_file():  # in an outage: one probe, not the whole spool
                self.client.get_run(self.run_id)
            for i in range(0, len(pending), 1000):
                chunk = [Metric(k, v, t, s) for k, v, t, s in pending[i : i + 1000]]
                self.client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:  # noqa: BLE001
            self._warn(err)
            self._spool(pending)
            return
        self._send_held()
        self._replay()

    def _opened(self) -> bool:
        """Whether the run exists; if it is PENDING, one bounded attempt to open it now and, when
        that works, the held calls in the order they were made."""
        if self.run_id:
            return True
        try:
            run_id = _open_run(self.cfg, self.uri, self.previous)
        except Exception:  # noqa: BLE001 - still down
            return False
        with self.lock:
            self.run_id = run_id
        self.warned = False
        print(f"MLflow at {self.shown_uri} is back: run {run_id}", file=sys.stderr)
        self._send_held()
        return True

    def _send_held(self) -> None:
        """The calls made before the run existed, in order; if one fails (the server went away
        again), it and the ones after it wait for the next flush that gets through."""
        while True:
            with self.lock:
                if not self.held:
                    return
                fn = self.held[0]
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                self._warn(err)
                return
            with self.lock:
                self.held.pop(0)

    def _spool(self, pending: list[tuple]) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        size = self.spool.stat().st_size if self.spool.is_file() else 0
        lines = "".join(json.dumps(list(p)) + "\n" for p in pending)
        if size + len(lines) > SPOOL_MAX_BYTES:
            self.dropped += len(pending)
            if self.dropped == len(pending):
                print(
                    f"warning: {self.spool} is full ({SPOOL_MAX_BYTES >> 20} MiB); newer metrics are dropped "
                    "until MLflow is back",
                    file=sys.stderr,
                )
            return
        with self.spool.open("a") as f:
            f.write(lines)

    def _replay(self) -> None:
        """Send the spool (metrics of an outage, or of an earlier process of the run) once, then remove it."""
        from mlflow.entities import Metric

        if not self.spool.is_file():
            self.warned = False
            return
        rows = [tuple(json.loads(line)) for line in self.spool.read_text().splitlines() if line.strip()]
        try:
            for i in range(0, len(rows), 1000):
                chunk = [Metric(k, v, t, s) for k, v, t, s in rows[i : i + 1000]]
                self.client.log_batch(self.run_id, metrics=chunk)
        except Exception as err:  # noqa: BLE001 - still down: the spool stays as it is
            self._warn(err)
            return
        self.spool.unlink(missing_ok=True)
        self.warned, self.dropped = False, 0
