"""Progress of a long job: a tqdm bar on a terminal, a periodic log line where output is not one.

SLURM and torchrun write stderr to files, where a bar is a stream of carriage returns; there the job logs
`precompute: 1200/5000 samples (24%), 310.5 samples/s, ETA 12s` through the standard `logging` module
(logger `curate.progress`) every 30 s (the environment variable CURATE_PROGRESS_EVERY_S sets another period)
and once at the end, so it lands wherever the user's logging configuration sends it (the `curate` command
sends INFO lines to stderr).
"""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = ["LogProgress", "progress"]

log = logging.getLogger("curate.progress")


def progress(total: int | None, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
             every_s: float | None = None, per_step: int | None = None):
    """A tqdm bar when stderr is a terminal (and tqdm is installed), else a `LogProgress`; nothing shown when
    not `enabled`.

    `every_s`: seconds between log lines (default: $CURATE_PROGRESS_EVERY_S, else 30).
    `per_step`: samples per unit (a training step's batch), so the log line gives samples/s too.
    """
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ModuleNotFoundError:  # the library without the app extra: log lines are still progress
            pass
        else:
            return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr)
    if every_s is None:
        every_s = _period()
    return LogProgress(total, desc, unit, initial=initial, enabled=enabled, every_s=every_s, per_step=per_step)


def _period() -> float:
    value = os.environ.get("CURATE_PROGRESS_EVERY_S", "30")
    try:
        period = float(value)
    except ValueError:
        period = -1.0
    if not period >= 0:
        raise ValueError(f"CURATE_PROGRESS_EVERY_S: expected seconds between progress lines (>= 0), got {value!r}")
    return period


class LogProgress:
    """The part of tqdm's interface the jobs use (`update`, `set_postfix`, `close`), as periodic log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 every_s: float = 30.0, per_step: int | None = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.every_s, self.per_step = every_s, per_step
        self.n = self.start_n = initial
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            log.info(self.line(now))

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.enabled and self.n > self.start_n:
            log.info(self.line(time.monotonic()))

    def line(self, now: float) -> str:
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}s"
        parts = [f"{self.desc}: {done}", f"{rate:.1f} {self.unit}s/s"]
        if self.per_step:
            parts.append(f"{rate * self.per_step:.1f} samples/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
