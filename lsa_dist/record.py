"""A run's metrics record, RUN/metrics.jsonl, and how far MLflow has it.

- The record (written by rank 0's sinks.MetricsFile, one line per log call, see
  `append_record`) is the one record of a run's metrics; MLflow catches up from it.
- Its mark, RUN/metrics.mlflow.json (`MARK_NAME`, written atomically), says how far into the
  record MLflow has received, and for which run id: the metrics of a line are on disk
  (fsynced) before the mark passes them.
- A later process of the same run (a resume, a requeue, a restart) sends what an earlier one
  left unsent; a new run in the same folder sends nothing of the run the mark names. A
  metric's MLflow timestamp is its line's time, so a batch sent twice (cut by a failure) is
  the same values again.

Nothing here imports MLflow until a batch is sent: the record is written whether or not
tracking is on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .fs import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)
RECORD_NAME = "metrics.jsonl"
MARK_NAME = "metrics.mlflow.json"  # beside the record: {"run_id": ..., "offset": bytes MLflow has}
METRICS_PER_BATCH = 1000  # MLflow's limits on one log_batch call
PARAMS_PER_BATCH = 100
CATCH_UP_BYTES = 4 << 20  # the record is sent from the mark in pieces of about this size


class Recorded(NamedTuple):
    """Where one log call's metrics are in the record: the line's time and the byte offset
    just after the line."""

    time: float
    end: int


Row = tuple[str, float, int, int]  # one metric: key, value, timestamp (ms), step


def append_record(path: Path, metrics: dict[str, float], step: int) -> Recorded:
    """Append one line {"step", "time", **metrics} to the record: the one format its writers
    (rank 0's MetricsFile, a Tracker used on its own) share with the catch-up that reads it."""
    when = time.time()
    line = json.dumps({"step": step, "time": when, **metrics}) + "\n"
    with Path(path).open("ab") as f:  # one writer per run folder (the run lock), so tell() is the end
        f.write(line.encode())
        return Recorded(when, f.tell())


def rows_of(metrics: dict[str, Any], step: int, when: float) -> list[Row]:
    """One log call's metrics as rows, stamped with its line's time (so a resend is identical)."""
    stamp = int(when * 1000)
    return [(key, float(value), stamp, step) for key, value in metrics.items()]


def read_record(path: Path, start: int, limit: int = CATCH_UP_BYTES) -> tuple[list[Row], int]:
    """The metrics of the complete lines after byte `start` (about `limit` bytes of them) and
    the offset just after the last line read. A line still being written is left for later;
    one that is not a record line (torn by a crash, then appended to) is passed over."""
    rows: list[Row] = []
    offset = start
    try:
        f = Path(path).open("rb")
    except FileNotFoundError:
        return rows, offset
    with f:
        f.seek(start)
        for line in f:
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            try:
                row = json.loads(line)
                step, when = int(row.pop("step")), float(row.pop("time"))
                rows += rows_of({k: v for k, v in row.items() if isinstance(v, (int, float))}, step, when)
            except (ValueError, TypeError, KeyError, AttributeError):
                pass
            if offset - start >= limit:
                break
    return rows, offset


def send_batches(client: Any, run_id: str, metrics: Sequence[Row] = (), params: Sequence[Any] = ()) -> None:
    """Log `params` (mlflow Params) then `metrics` to the run in order, in log_batch calls
    within MLflow's limits: the only place a batch is built. Raises what the client raises."""
    from mlflow.entities import Metric

    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=list(params[i : i + PARAMS_PER_BATCH]))
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        chunk = [Metric(k, v, t, s) for k, v, t, s in metrics[i : i + METRICS_PER_BATCH]]
        client.log_batch(run_id, metrics=chunk)


class Mark:
    """The mark beside a record: which MLflow run has its lines up to `offset`.

    `run_id` and `offset` are this process's view once `claim` has bound the mark to a run;
    they only move forward, and the file follows each move.
    """

    def __init__(self, record: Path) -> None:
        self.record = Path(record)
        self.path = self.record.with_name(MARK_NAME)
        self.run_id = ""
        self.offset = 0

    def read(self) -> tuple[str, int] | None:
        """The mark on disk as (run id, offset); None if there is none yet (or it is unreadable)."""
        try:
            mark = json.loads(self.path.read_text())
            return str(mark["run_id"]), int(mark["offset"])
        except (OSError, ValueError, TypeError, KeyError):
            return None  # no line before this process's own is sent

    def reserve(self, run_id: str, start: int) -> None:
        """Without a mark yet, give the lines before `start` to `run_id` (the run a process
        that does not know its own run id yet will continue), so that claiming sends them."""
        if self.read() is None:
            self._write(run_id, start)

    def claim(self, run_id: str, start: int) -> bool:
        """Bind the mark to `run_id`, whose metrics start at the mark if it is this run's (or a
        run that did not exist yet), else at `start` (this process's first line), so that
        nothing of another run is sent to this one. Returns whether lines await sending."""
        mark = self.read()
        size = self.size()
        if mark is not None and mark[0] in ("", run_id) and mark[1] <= size:
            offset = mark[1]
        else:
            offset = start
            if mark is not None and mark[1] < start:
                logger.warning(
                    f"note: {self.record} holds metrics of MLflow run {mark[0]} that never reached it; "
                    f"they are not sent to run {run_id}"
                )
        self.run_id, self.offset = run_id, offset
        self._write(run_id, offset)
        return size > offset

    def move(self, offset: int) -> None:
        """MLflow has the record up to `offset` (never backwards)."""
        if offset > self.offset:
            self.offset = offset
            self._write(self.run_id, offset)

    def catch_up(self, client: Any) -> None:
        """Send the record's complete lines after the mark to its run, in order, piece by piece
        (the mark follows each, so a failure midway costs at most one piece sent again)."""
        while True:
            rows, offset = read_record(self.record, self.offset)
            if offset == self.offset:
                return
            send_batches(client, self.run_id, rows)
            self.move(offset)

    def rewind(self, run_id: str, offset: int) -> None:
        """Put the mark at `offset` for `run_id`, backwards too: for a record cut shorter."""
        self.run_id, self.offset = run_id, offset
        self._write(run_id, offset)

    def size(self) -> int:
        """The record's length in bytes (0 before its first line)."""
        return self.record.stat().st_size if self.record.is_file() else 0

    def _write(self, run_id: str, offset: int) -> None:
        if self.record.is_file():  # the lines the mark passes are on disk before it says so
            fd = os.open(self.record, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"run_id": run_id, "offset": offset})


def last_steps(path: Path) -> dict[str, int]:
    """The last step each metric has a line for in the record ({} without one)."""
    found: dict[str, int] = {}
    offset = 0
    while True:
        rows, end = read_record(path, offset)
        for key, _, _, step in rows:
            found[key] = max(step, found.get(key, step))
        if end == offset:
            return found
        offset = end


def cut_record(path: Path, step: int, aside: Path) -> None:
    """Keep the record's lines up to `step` (a branch goes on from there); the later ones go to
    aside/metrics.jsonl with the checkpoints they belong to. The mark keeps pointing at the
    same lines (its offset counts only what is kept)."""
    path = Path(path)
    if not path.is_file():
        return
    mark = Mark(path)
    on_disk = mark.read()
    kept, left, passed = [], [], 0
    with path.open("rb") as f:
        for line in f:
            try:
                late = int(json.loads(line)["step"]) > step
            except (ValueError, TypeError, KeyError):
                late = False  # a torn line stays where it is
            (left if late else kept).append(line)
            if on_disk and f.tell() <= on_disk[1] and not late:
                passed += len(line)
    if not left:
        return
    aside.mkdir(parents=True, exist_ok=True)
    with (aside / RECORD_NAME).open("ab") as f:
        f.write(b"".join(left))
    atomic_write_bytes(path, b"".join(kept))
    if on_disk:
        mark.rewind(on_disk[0], passed)
