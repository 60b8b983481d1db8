"""The resume plan: which checkpoint a launch or a restart continues, decided once from the
run folder (lineage, fall-back over unreadable checkpoints, compatibility), and the lineage
decision the lock holder carries out before any worker starts."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import META, CheckpointError, CheckpointManager, read_meta
from ..config import RunConfig, flatten, flatten_tree, is_math_key
from ..fs import atomic_write_bytes, atomic_write_text, fsync_dir
from ..record import MARK_NAME, RECORD_NAME, cut_record
from ..redact import first_line

logger = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    """What a launch (or a restart) of a run resumes, decided once from the run folder."""

    folder: Path | None = None  # the checkpoint to load; None: a new run
    fallbacks: list[Path] = field(default_factory=list)  # older good checkpoints, newest first
    passed_over: list[tuple[Path, str]] = field(default_factory=list)  # unreadable ones, and why
    leave: list[Path] = field(default_factory=list)  # checkpoints the new lineage or branch leaves
    accepted: list[str] = field(default_factory=list)  # changed keys train.accept_changes accepts
    run_id: str = ""  # the MLflow run it continues ('' for a new one)
    saved_world_size: int = 0
    resume: str = "auto"  # train.resume as given

    @property
    def moves(self) -> list[Path]:
        """What the lock holder moves aside: the left lineage and the unreadable checkpoints."""
        return [*self.leave, *(folder for folder, _ in self.passed_over)]


def checkpoints_of(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(Path(run_dir) / "checkpoints", 1, 0)


def plan_resume(cfg: RunConfig, world_size: int, dataset_sha256: str = "", restarted: bool = False) -> ResumePlan:
    """The plan for a launch of `cfg` on `world_size` ranks (or, `restarted`, for workers started
    again after a failure or a requeue). CheckpointError (one line, exit 2) if the launch would mix
    lineages, change the run's mathematics, or names a checkpoint that cannot be read."""
    run_dir, resume = cfg.run_dir, cfg.train.resume
    plan = ResumePlan(resume=resume)
    own = restarted or resume == "auto"
    if restarted:
        requested = checkpoints_of(run_dir).latest() or checkpoint_to_resume(run_dir, resume)
    else:
        plan.leave = check_lineage(run_dir, resume, cfg.train.overwrite)
        requested = checkpoint_to_resume(run_dir, resume)
    if requested is None:
        return plan
    candidates = [requested]
    if own and requested.parent == checkpoints_of(run_dir).root:
        older = [c for c in checkpoints_of(run_dir).complete() if c.name < requested.name]
        candidates += reversed(older)
    for candidate in candidates:
        try:
            parts = read_parts(candidate)
            break
        except UnreadablePartError as err:
            if not own:
                raise CheckpointError(f"cannot load checkpoint {candidate}: {err}") from None
            plan.passed_over.append((candidate, str(err)))
    else:
        return plan  # nothing readable left: a new run, after the warnings
    plan.folder = candidate
    plan.fallbacks = candidates[candidates.index(candidate) + 1 :]
    meta = parts.meta
    plan.saved_world_size = int(meta.get("world_size", 1))
    plan.accepted = check_compatible(candidate, flatten(cfg), dataset_sha256, cfg.train.accept_changes, parts)
    plan.run_id = meta.get("run_id", "") if own else ""
    return plan


class UnreadablePartError(CheckpointError):
    """A part of a checkpoint cannot be read; the message names the part and why."""


@dataclass(frozen=True)
class Parts:
    """A checkpoint's meta.json and config.yaml, parsed, its RNG files seen to exist. (Engine
    files are vetted and read when they are loaded.)"""

    meta: dict[str, Any]
    config: dict[str, Any]


def read_parts(folder: Path) -> Parts:
    """The parts of `folder` a resume plan reads, each read once; UnreadablePartError naming the first
    part that cannot be read."""
    import yaml

    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise UnreadablePartError(f"{META} is missing") from None
    except (OSError, ValueError) as err:
        raise UnreadablePartError(f"{META} is corrupt ({first_line(err)})") from None
    if not isinstance(meta, dict):
        raise UnreadablePartError(f"{META} holds no record")
    if not (folder / "config.yaml").is_file():
        raise UnreadablePartError("config.yaml is missing")
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise UnreadablePartError(f"config.yaml is corrupt ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise UnreadablePartError("config.yaml holds no config")
    for rank in range(int(meta.get("world_size", 1))):
        if not (folder / "rng" / f"rank{rank}.pt").is_file():
            raise UnreadablePartError(f"rng/rank{rank}.pt is missing")
    return Parts(meta, config)


def parts_of(folder: Path) -> Parts:
    """read_parts, its error naming the checkpoint (for a checkpoint that is not a fall-back)."""
    try:
        return read_parts(folder)
    except UnreadablePartError as err:
        raise CheckpointError(f"cannot load checkpoint {folder}: {err}") from None


def take_lineage(plan: ResumePlan, run_dir: Path, say: Callable[[str], None] = logger.info) -> None:
    """Carried out by the process that holds the run's lock, before any worker starts: the
    checkpoints the plan leaves or passes over go into RUN/set_aside/<time>/ (with WHY.txt)."""
    present = [folder for folder in plan.moves if folder.is_dir()]
    if not present:
        return
    instead = plan.folder or "a new run (no earlier checkpoint is readable)"
    for folder, fault in plan.passed_over:
        if folder in present:
            say(f"warning: cannot use checkpoint {folder}: {fault}; falling back to {instead}")
    why = {folder: fault for folder, fault in plan.passed_over}
    moved = set_aside(run_dir, present, {f.name: why.get(f, "left by a new lineage or branch") for f in present})
    if plan.leave:
        set_record_aside(plan, Path(run_dir), moved)
        say(f"train.resume={plan.resume}: {len(plan.leave)} earlier checkpoint(s) moved to {moved}")


def set_record_aside(plan: ResumePlan, run_dir: Path, aside: Path) -> None:
    """The metrics of what a new lineage or a branch leaves go with its checkpoints: the whole
    record and its MLflow mark for a new lineage (none of it may reach the new run), the lines
    after the branch's step for a branch of this run."""
    record = run_dir / RECORD_NAME
    own = checkpoints_of(run_dir).root.resolve()
    if plan.folder is not None and plan.folder.resolve().parent == own:
        cut_record(record, int(read_meta(plan.folder).get("step", 0)), aside)
        return
    for path in (record, record.with_name(MARK_NAME)):
        if path.is_file():
            path.rename(aside / path.name)


def checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a launch with `train.resume` would continue from: the run's latest (auto),
    the folder named, or None (never, or a new run)."""
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoints_of(run_dir).latest()
    return Path(resume)


def lineage_conflict(run_dir: Path, resume: str) -> tuple[list[Path], bool]:
    """The run folder's checkpoints that a launch with `resume` would neither continue from nor
    may keep beside its own, and whether setting them aside needs train.overwrite.

    auto continues the latest: nothing. A checkpoint of this run (a rollback) starts a new
    branch: the later checkpoints go aside by themselves. never, or another run's checkpoint,
    would start a new lineage in a folder that holds one: all of them, and only when asked to."""
    existing = checkpoints_of(run_dir).complete()
    if resume == "auto" or not existing:
        return [], False
    if resume != "never":
        target = Path(resume).resolve()
        if target.parent == existing[0].parent.resolve():
            return [p for p in existing if p.name > target.name], False
    return existing, True


def check_lineage(run_dir: Path, resume: str, overwrite: bool) -> list[Path]:
    """The checkpoints a launch with `resume` leaves; CheckpointError if that needs
    train.overwrite and it is not given."""
    conflict, needs_overwrite = lineage_conflict(run_dir, resume)
    if conflict and needs_overwrite and not overwrite:
        try:
            newest = read_meta(conflict[-1]).get("step", "?")
        except CheckpointError:
            newest = "?"
        raise CheckpointError(
            f"train.resume={resume}: {Path(run_dir) / 'checkpoints'} holds this run's checkpoints (up to step "
            f"{newest}); continue them with train.resume=auto, start another run with train.name=<new>, or "
            "add train.overwrite=true to move them aside (into set_aside/ in the run folder)"
        )
    return conflict


def set_aside(run_dir: Path, folders: list[Path], why: dict[str, str] | None = None) -> Path:
    """Move checkpoint folders into run_dir/set_aside/<time>/ (nothing is deleted), with WHY.txt
    naming the reason for each, and point `latest` at the newest checkpoint left (or remove it)."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    target = Path(run_dir) / "set_aside" / stamp
    while target.exists():  # two in one second
        n += 1
        target = target.with_name(f"{stamp}.{n}")
    target.mkdir(parents=True)
    for folder in folders:
        folder.rename(target / folder.name)
    if why:
        atomic_write_text(target / "WHY.txt", "".join(f"{name}: {reason}\n" for name, reason in sorted(why.items())))
    manager = checkpoints_of(run_dir)
    left = manager.complete()
    pointer = manager.root / "latest"
    if left:
        atomic_write_bytes(pointer, left[-1].name.encode())
    else:
        pointer.unlink(missing_ok=True)
    fsync_dir(target)
    fsync_dir(manager.root)
    return target


def config_changes(
    folder: Path, new: dict[str, Any], dataset_sha256: str, parts: Parts | None = None
) -> dict[str, tuple[Any, Any]]:
    """What a resume from `folder` (its `parts`, if already read) would change of the run's
    mathematics: the keys the schema marks as such whose value differs between the checkpoint's
    config and `new` (a flat config), and "dataset" when the dataset.json checksum differs
    (data.root itself may move)."""
    parts = parts or parts_of(folder)
    old = flatten_tree(parts.config)
    keys = sorted(k for k in set(old) | set(new) if is_math_key(k))
    changes = {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}
    saved_sha = parts.meta.get("dataset_sha256", "")
    if saved_sha and dataset_sha256 and saved_sha != dataset_sha256:
        changes["dataset"] = (saved_sha[:12], dataset_sha256[:12])
    return changes


def check_compatible(
    folder: Path, new: dict[str, Any], dataset_sha256: str, accepted: list[str], parts: Parts | None = None
) -> list[str]:
    """CheckpointError naming the changed keys unless train.accept_changes lists each of them
    (a key, or its section: "optim"). Returns the accepted changed keys."""
    changes = config_changes(folder, new, dataset_sha256, parts)

    def ok(key: str) -> bool:
        return any(key == a or key.startswith(a.rstrip(".") + ".") for a in accepted)

    refused = [k for k in changes if not ok(k)]
    if refused:
        shown = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise CheckpointError(
            f"resuming {folder} would change the run: {shown}; start another run (train.name=<new>), or accept "
            f"with train.accept_changes=[{','.join(refused)}]"
        )
    return list(changes)
