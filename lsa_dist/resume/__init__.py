"""Resume as one subsystem: which checkpoint a launch or a restart continues, and how.

- `plan_resume(cfg, world_size, ...) -> ResumePlan` (plan.py), computed by the launchers'
  pre-flight and by every rank from the run folder: lineage (`train.resume=auto` continues the
  latest checkpoint; `never`, or another run's checkpoint, starts a new lineage, refused on a
  folder with checkpoints unless `train.overwrite`; an older checkpoint of this run starts a
  branch), fall-back over the run's own checkpoints whose meta.json, config.yaml or RNG files
  cannot be read (a warning naming the part), and compatibility: the fields the schema marks as
  the run's mathematics must be unchanged or accepted with `train.accept_changes`. A restart
  (the local launcher's --max-restarts, a SLURM requeue) continues the run's own latest
  checkpoint. A checkpoint named by `train.resume=PATH` is never replaced: its fault is an error.
- `take_lineage(plan, run_dir)`: carried out by the process that holds the run's lock before any
  worker starts (the launchers; rank 0 under torchrun): what the new lineage or branch leaves,
  and unreadable checkpoints, go into RUN/set_aside/<time>/ with WHY.txt; nothing is deleted.
- `restore(...)` (restore.py), on every rank: load with fall-back where the engine's files fail
  on any rank, then continue the saved layout and place the lr schedule (reshard.py, with
  DeepSpeed's universal checkpoint conversion for ZeRO partitions of another world size).
"""

from .plan import (
    ResumePlan,
    check_compatible,
    check_lineage,
    checkpoint_to_resume,
    config_changes,
    lineage_conflict,
    plan_resume,
    read_parts,
    set_aside,
    take_lineage,
)
from .reshard import Here, continue_layout, to_universal
from .restore import Restored, load_with_fallback, restore

__all__ = [
    "Here",
    "ResumePlan",
    "Restored",
    "check_compatible",
    "check_lineage",
    "checkpoint_to_resume",
    "config_changes",
    "continue_layout",
    "lineage_conflict",
    "load_with_fallback",
    "plan_resume",
    "read_parts",
    "restore",
    "set_aside",
    "take_lineage",
    "to_universal",
]
