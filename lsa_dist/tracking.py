"""MLflow tracking: one run per training run, written by rank 0 only.

- The backend is tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite database in the
  project folder (sqlite:///<cwd>/mlflow.db; MLflow 3 refuses the old ./mlruns store).
- `prepare()` runs once before any worker starts (launchers call it): it creates the
  database and experiment (several processes creating a fresh sqlite schema at once crash)
  and decides the run: the one recorded in the run's latest checkpoint, or a new one.
- RUN/metrics.jsonl is the one record of a run's metrics and its mark says how far MLflow has
  it (lsa_dist.record). While the server answers, metrics are queued and sent in batches every
  flush_every_s from a background thread, and the mark follows. If it cannot be reached, a
  warning is printed once per outage and the queue is dropped (its lines are in the record);
  when it answers again, the lines after the mark are sent once, in order. Tracking never
  stops training.
- A server that is down at launch costs one bounded attempt (no retries, a 10 s timeout): the
  run id is then PENDING, rank 0 trains at once and creates (or continues) the run when the
  server answers, sending the params, tags and artifacts it held back (in the order they were
  made), then the metrics from the record.
- Runs end FINISHED, KILLED (stopped on request) or FAILED (crashed: by rank 0 on its way
  out, or by the local launcher when rank 0 died).
- Params are the flattened resolved config and the config artifact its YAML, both with secrets
  redacted (lsa_dist.redact: URL credentials, signed-URL parameters, credential headers,
  secret-looking keys), as are the backend's address in messages; no environment variable is
  logged, and the keys whose values come from one (${oc.env:...}, tracking.from_env) show ***.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

from .config import RunConfig, flatten
from .record import MARK_NAME, RECORD_NAME, Mark, Recorded, append_record, read_record, rows_of, send_batches
from .redact import first_line, redact_params, redact_text

__all__ = [  # the record's names stay importable from here, where they were first defined
    "MARK_NAME",
    "PENDING",
    "RECORD_NAME",
    "RUN_ID_ENV",
    "Recorded",
    "Tracker",
    "append_record",
    "end_run",
    "prepare",
    "read_record",
    "run_id_for",
    "send_batches",
    "system_info",
    "tracking_uri",
]

logger = logging.getLogger(__name__)
RUN_ID_ENV = "LSA_MLFLOW_RUN_ID"
PENDING = "pending"  # the run is created by rank 0 once the server answers


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
    # (what a failed send held is sent again from metrics.jsonl, so retrying here only delays training)
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
        logger.warning(
            f"warning: MLflow at {redact_text(uri)} is unreachable ({first_line(err)}); training starts now and "
            f"the run is created when the server answers (metrics are sent then from {cfg.run_dir / RECORD_NAME})"
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
    except Exception:  # noqa: BLE001, S110 - best effort: the run's metrics are there or in metrics.jsonl
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
    run is created; the calls made meanwhile are then replayed in order. `record` is the run's
    metrics.jsonl; its `mark` (lsa_dist.record.Mark, beside it) says how far MLflow has it.
    """

    def __init__(
        self, cfg: RunConfig, run_id: str, record: Path, flush_every_s: float = 5.0, previous: str = ""
    ) -> None:
        self.cfg = cfg
        self.enabled = bool(run_id)
        self.run_id = "" if run_id == PENDING else run_id
        self.previous = previous
        self.uri = tracking_uri(cfg)
        self.shown_uri = redact_text(self.uri)  # for messages: without credentials
        self.record = Path(record)
        self.mark = Mark(self.record)  # how far MLflow has the record, and for which run
        self.warned = run_id == PENDING  # the launcher (or prepare here) has said so already
        self.held: list[Any] = []  # calls made before the run exists
        self.lock = threading.Lock()  # run_id and held: the training thread's and the sender's
        self.flushing = threading.Lock()  # one flush at a time (the thread's, finish's)
        self.queue: queue.Queue = queue.Queue()
        self.behind = False  # lines after the mark that the queue does not hold: send from the record
        self.flush_every_s = flush_every_s
        self.closed = threading.Event()
        self.thread = None
        self.system: Any = None  # MLflow's SystemMetricsMonitor of this node, if started
        if self.enabled:
            # the record's lines before this process's own: an earlier process's, sent only to its run
            self.start = self.mark.size()
            if self.run_id:
                self.behind = self.mark.claim(self.run_id, self.start)
            else:  # they go to the run this process opens (or continues)
                self.mark.reserve(self.previous, self.start)
            self.client = _client(self.uri)
            if self.run_id:  # a restarted or requeued attempt continues a run an earlier one ended
                self._call(lambda: self.client.update_run(self.run_id, status="RUNNING"))
            self.thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
            self.thread.start()

    # -- what training calls ------------------------------------------------------------------
    def log_params(self, params: dict[str, Any], hidden: list[str] | tuple[str, ...] = ()) -> None:
        """Params not yet in the run (a continued run keeps its first values), redacted: *** for
        the keys in `hidden` (and below them)."""
        if self.enabled:
            self._call(lambda: self._log_new_params(redact_params(params, hidden)))

    def _log_new_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        send_batches(self.client, self.run_id, params=[Param(k, v) for k, v in params.items() if k not in existing])

    def log_config(self, cfg: RunConfig) -> None:
        """The flattened config as params; the values that came from environment variables
        (tracking.from_env) are not shown."""
        self.log_params(flatten(cfg), hidden=cfg.tracking.from_env)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._call(lambda k=key, v=value: self.client.set_tag(self.run_id, k, v))

    def log_metrics(self, metrics: dict[str, float], step: int, at: Recorded | None = None) -> None:
        """Queued; sent in batches by the background thread. `at` is where rank 0's MetricsFile
        wrote these metrics in the record; without it they are appended to the record here, so
        that nothing reaches MLflow that the record does not hold first."""
        if not self.enabled:
            return
        if at is None:
            at = append_record(self.record, metrics, step)
        self.queue.put((at.end, rows_of(metrics, step, at.time)))

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
                logger.warning(f"warning: the model was not logged to MLflow ({first_line(err)})")

        self._call(log)

    def monitor_system(self, run_id: str, node: int, nodes: int) -> None:
        """MLflow's system metrics of this node (CPU, memory, disk, network, GPU where there is
        one) sent to `run_id` by MLflow's own monitor thread until `finish`; called on one process
        per node. Nothing is started for a run not yet opened (the server was down at launch)."""
        tracking = self.cfg.tracking
        if not (tracking.enabled and tracking.system_metrics and run_id) or run_id == PENDING:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
            self.system = SystemMetricsMonitor(
                run_id,
                sampling_interval=tracking.system_metrics_interval_s,
                resume_logging=True,  # a resumed run's samples go on after its earlier ones
                node_id=f"node{node}" if nodes > 1 else None,
                tracking_uri=self.uri,
            )
            self.system.start()
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.system = None
            logger.warning(f"warning: no system metrics in MLflow ({first_line(err)})")

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left (queued, or in the record after the mark) and end the run with `status`."""
        if self.system is not None:
            self.system.finish()
            self.system = None
        if not self.enabled:
            return
        self.closed.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        self._flush()
        if not self.run_id:
            logger.warning(
                f"warning: MLflow at {self.shown_uri} never answered: the run's metrics are kept in {self.record}; "
                "run the same command again when it is back to send them"
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
            logger.warning(
                f"warning: MLflow at {self.shown_uri} is unreachable ({first_line(err)}); metrics are kept in "
                f"{self.record} and sent from there when it is back. Training continues."
            )

    def _worker(self) -> None:
        while not self.closed.wait(self.flush_every_s):
            self._flush()

    def _flush(self) -> None:
        """Send what was queued, or, after an outage or an earlier process's unsent lines, the
        record from the mark; then move the mark. A failure leaves the mark where it was."""
        with self.flushing:
            queued = []
            while True:
                try:
                    queued.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if not self._opened():
                self.behind = True  # the queue is dropped: its lines are in the record
                return
            if not (queued or self.behind):
                return
            try:
                if self.warned:  # in an outage: one probe, not the backlog
                    self.client.get_run(self.run_id)
                if self.behind:
                    self.mark.catch_up(self.client)
                    self.behind = False  # what is queued now lies before the mark or comes after it
                else:
                    fresh = [r for end, rows in queued if end > self.mark.offset for r in rows]
                    send_batches(self.client, self.run_id, fresh)
                    self.mark.move(max(end for end, _ in queued))
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                self.behind = True
                self._warn(err)
                return
            self.warned = False
            self._send_held()

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
        logger.warning(f"MLflow at {self.shown_uri} is back: run {run_id}")
        self.behind = self.mark.claim(run_id, self.start)
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
