"""The one way benchmarks write their JSON reports: `curate.files.write_json` (atomic)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_json"]


def write_json(report: dict, out: str | Path) -> Path:
    """Write `report` to `out` atomically, so an interrupted run never leaves a half-written result."""
    from curate.files import write_json as write

    out = Path(out)
    write(out, report, indent=1, parents=True)
    return out
