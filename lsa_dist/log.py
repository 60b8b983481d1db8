"""What the library and its entry points say, through the standard `logging` module.

Modules log to `logging.getLogger(__name__)`, children of the "lsa_dist" logger; an entry point
(a launcher, `python -m lsa_dist.train`, the SLURM job, a tool) calls `setup_logging(rank)` once.
Records are plain lines ("%(message)s"). Below WARNING they go to stdout and from WARNING up to
stderr: the streams these lines had as prints, so scripts and tests reading them see no change.
Rank 0 speaks: other ranks show only WARNING and above (every rank's errors still show), and
records logged with `extra=EVERY_RANK` (a line each rank's own log needs).

The handlers write to whatever sys.stdout and sys.stderr are when a record arrives, so the
wrappers entry points install (`redact.redact_output`, the launcher's `SurvivingStdout`) apply
whether they come before or after `setup_logging`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

ROOT = "lsa_dist"
# extra= for a record that every rank shows, not rank 0 alone
EVERY_RANK: dict[str, Any] = {"every_rank": True}


class CurrentStream(logging.StreamHandler):
    """A handler writing to the current sys.stdout or sys.stderr (`which`), looked up at each
    record rather than held: a stream replaced later is used, never a stale one."""

    def __init__(self, which: str) -> None:
        logging.Handler.__init__(self)  # StreamHandler's own __init__ would hold a stream
        self.which = which

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, value: TextIO) -> None:
        # setStream (redact_output rewraps handlers that hold sys.stdout) has nothing to
        # change: the next record already finds the new sys.stdout
        pass


class RankFilter(logging.Filter):
    """Rank 0 shows every record; other ranks WARNING and above and EVERY_RANK records."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING or getattr(record, "every_rank", False)


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


def setup_logging(rank: int) -> None:
    """Show the library's records as plain lines for a process of rank `rank`: INFO and below
    on stdout, WARNING and above on stderr. Calling it again replaces what it installed."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, CurrentStream)]:
        logger.removeHandler(handler)
    out, err = CurrentStream("stdout"), CurrentStream("stderr")
    out.addFilter(_below_warning)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankFilter(rank))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # shown once, here: a root handler (basicConfig, a library's) would repeat or reformat them
    logger.propagate = False
