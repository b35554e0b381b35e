"""The one way benchmarks write their JSON reports: folder made, temp file, atomic rename."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_json"]


def write_json(report: dict, out: str | Path) -> Path:
    """Write `report` to `out` atomically, so an interrupted run never leaves a half-written result."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    return out
