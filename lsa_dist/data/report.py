"""The converter's closing report, from the dataset.json it wrote."""

from __future__ import annotations

from collections import Counter
from typing import Any

LISTED = 10  # files named per kind in the report; dataset.json lists every one


def summary(manifest: dict[str, Any]) -> str:
    """Per split: files converted, fixed by kind, skipped by reason and given another key because
    theirs was another file's, the first of them named (the rest are in dataset.json)."""
    lines = []
    for split, entry in manifest["splits"].items():
        fixed = sum(entry["fixed"].values())
        lines.append(
            f"{split}: {entry['num_samples']} of {entry['num_source_files']} images converted "
            f"into {len(entry['shards'])} shards, {fixed} fixed, {len(entry['skipped'])} skipped"
        )
        for kind, count in entry["fixed"].items():
            lines.append(f"  fixed   {count:>6}  {kind}")
        reasons = Counter(s["reason"] for s in entry["skipped"])
        for reason, count in reasons.most_common():
            lines.append(f"  skipped {count:>6}  {reason}")
        lines += _listed([f"{s['path']}: {s['reason']}" for s in entry["skipped"]])
        collisions = entry.get("collisions", [])  # absent from dataset.json files of older converters
        if collisions:
            lines.append(f"  renamed {len(collisions):>6}  key shared with another file")
            lines += _listed([f"{c['path']} -> {c['key']} ({c['reason']})" for c in collisions])
    return "\n".join(lines)


def _listed(items: list[str]) -> list[str]:
    """The first LISTED items as report lines, and how many more dataset.json holds."""
    lines = [f"    {item}" for item in items[:LISTED]]
    if len(items) > LISTED:
        lines.append(f"    ... {len(items) - LISTED} more listed in dataset.json")
    return lines


__all__ = ["summary"]
