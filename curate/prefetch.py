"""`Prefetch`: the next superbatch loaded, scored and selected in a background thread while step n trains."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torchdata.nodes import BaseNode

from .score import Score
from .stage import LAST, Stage, chain
from .sync import WeightSync

__all__ = ["Prefetch"]

T = TypeVar("T")


class Prefetch(Stage[T]):
    """Produces the next item in a background thread while the training loop uses the current one.

    Item n+1 (a superbatch loaded, scored and selected) is started when item n is handed out, so its
    scores come from the weights before training step n: one step earlier than live scoring. The
    scoring weights must not change while item n+1 is scored, so the upstream scores from a
    `WeightSync` snapshot:

    * `push_sync=True` (the pipeline's own sync): the snapshot is pushed from the learner at every
      hand-out, in the training thread, before item n+1 starts, while nothing reads it.
    * `push_sync=False` (a user's sync, pushed by its optimizer hook): the sync's lock is taken at
      hand-out and released when item n+1 is ready, so a push during step n waits for that scoring.

    Args:
        source: upstream node (everything up to selection).
        sync: the `WeightSync` the upstream scores from, or None when it scores no changing model.
        push_sync: push `sync` at every hand-out (True) or hold its lock while scoring (False).
        device: where the upstream computes. On CUDA the background work runs on a stream of its own, so it
            overlaps the training step's kernels; the thread waits for that stream's work (an event, not the
            whole device) before the item counts as ready, and the hand-out orders the training stream after it.

    `get_state()` is the upstream's state right after the item last handed out (captured in the
    thread), so a resumed pipeline replays the prefetched item instead of skipping it. (torchdata's
    `Prefetcher` snapshots state the same way but starts item n+1 inside its own `next()`, before the
    weights can be pinned, hence this node.)
    """

    gauges = {"prefetch": LAST}

    def __init__(self, source: BaseNode, sync: WeightSync | None = None, push_sync: bool = False,
                 device: torch.device | str | None = None):
        for node in chain(source):
            if isinstance(node, Score) and node.learner is not None and node.learner.live:
                raise ValueError("Prefetch: the Score stage upstream scores the live learner, which the optimizer "
                                 "rewrites while the next superbatch is scored in the background; score a "
                                 "curate.WeightSync of it (curate.resolve_learner(model, prefetch=1) makes one)")
        super().__init__(source)
        self.sync, self.push_sync = sync, push_sync
        device = None if device is None else torch.device(device)
        self._stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="curate-prefetch")
        self._future: Future[tuple[Any, dict]] | None = None  # (item or StopIteration, upstream state after it)

    def reset(self, initial_state: dict | None = None):
        self._drain()  # before the upstream is reset: the thread may still be reading it
        super().reset(initial_state)
        self._state = self.source.state_dict()
        self._done = False

    def _drain(self) -> None:
        if self._future is not None:
            self._future.exception()  # wait for it; what it produced or raised belongs to the old epoch
            self._future = None

    def _job(self, held: threading.Lock | None) -> tuple[Any, dict]:
        try:
            with contextlib.nullcontext() if self._stream is None else torch.cuda.stream(self._stream):
                try:
                    item = next(self.source)
                except StopIteration:
                    item = StopIteration
            if self._stream is not None:  # its kernels read the snapshot: done before a push may rewrite it
                self._stream.record_event().synchronize()
            return item, self.source.state_dict()
        finally:
            if held is not None:
                held.release()

    def _submit(self) -> Future[tuple[Any, dict]]:
        held = self.sync.lock if self.sync is not None and not self.push_sync else None
        if self.sync is not None and self.push_sync:
            self.sync.push()  # the thread is idle: nothing reads the snapshot now
        elif held is not None:
            held.acquire()  # released by the job: pushes wait until this item is scored
        self._future = future = self._pool.submit(self._job, held)
        return future

    def next(self):
        if self._done:
            raise StopIteration
        future = self._future
        if future is None:
            future = self._submit()
        item, state = future.result()
        self._future = None
        if item is StopIteration:
            self._done = True
            raise StopIteration
        self._state = state
        if self._stream is not None:
            _hand_over(item, self._stream)
        self._submit()
        return item

    def _source_state(self) -> dict:
        return self._state

    def stats(self) -> dict:
        return {"prefetch": 1}

    def wait(self) -> None:
        """Block until the item being prepared in the background is ready (it is kept for the next `next()`)."""
        if self._future is not None:
            self._future.exception()

    def close(self) -> None:
        """Wait for the item in flight and stop the background thread."""
        self._drain()
        self._pool.shutdown(wait=True)

    def __del__(self):
        pool = getattr(self, "_pool", None)  # absent when __init__ refused its arguments
        if pool is not None:
            pool.shutdown(wait=False)


def _hand_over(item, stream: torch.cuda.Stream) -> None:
    """The training stream may use `item`'s tensors, made on `stream`: order it after that stream's work, and tell
    the caching allocator the tensors are in use there (so their memory is not reused while it reads them)."""
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for value in item.values() if isinstance(item, dict) else ():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(current)
