"""DeepSpeed's universal checkpoint converter (`deepspeed.checkpoint.ds_to_universal`), run
with every torch.load reading weights only (tensors, containers and the checkpoint's trusted
classes): `python -m lsa_dist.resume.universal <its arguments>`, as resume.to_universal does."""

from __future__ import annotations

import os
import runpy

import torch

from ..checkpoint import FORCE_WEIGHTS_ONLY, trusted_classes

if __name__ == "__main__":
    os.environ[FORCE_WEIGHTS_ONLY] = "1"  # inherited by its worker processes too
    torch.serialization.add_safe_globals(trusted_classes())
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
