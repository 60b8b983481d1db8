"""Errors that several modules raise, kept low so that none of them imports another for it."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names it."""
