"""`WeightSync`: the learner's weights for scoring that runs elsewhere (a thread, DataLoader workers, a device).

Scores must come from the learner's current weights, but scoring must not stall training. When it
runs in a background thread, in DataLoader workers or on another device, it cannot read the live
model (the optimizer rewrites it in place mid-forward), so it reads a *snapshot* that `WeightSync`
refreshes after optimizer steps.

Transports:

* in-process (`shared=False`): the snapshot is a module copy (default: `copy.deepcopy(learner)`); a push
  copies tensor by tensor under a lock (on CUDA the copies are enqueued without blocking the host, and
  scoring on the same stream is ordered after them).
* cross-process (`shared=True`): the snapshot's tensors live in shared memory, so a `WeightSync` sent to
  DataLoader workers (fork or spawn) carries handles, not weights, once per worker start. The owner
  writes under a seqlock: a shared counter is odd while it writes and even after. A worker copies the
  shared weights into its own module only when the counter changed, and keeps the copy only if the
  counter was even and unchanged across the copy, so it never scores with a half-written model and
  the owner never waits for a worker's copy. The counter is read and written only under a cross-process
  lock (a POSIX semaphore, held for a counter update, never for a copy): its release and acquire order the
  owner's weight stores before the even value is seen and a worker's loads before its second counter read,
  on any CPU (x86-64, Arm: Grace, Graviton), with no reliance on x86-64's ordered stores.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import multiprocessing.synchronize
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .scorers import ModelScores, model_device, score_model

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["WeightSync"]

_SEQ, _STEPS, _SYNCED = 0, 1, 2  # slots of the shared counter tensor
_LOCK_TIMEOUT_S = 60.0  # the lock is held for microseconds: a minute means its holder died


class _ProcessLock:
    """A lock shared by processes: a POSIX semaphore (sem_wait/sem_post are full memory barriers) that
    pickles by name, so it travels in any pickle torch.multiprocessing sends (DataLoader workers, queues), not
    only in a child's start-up arguments as a `multiprocessing.Lock` does. Held only for counter updates."""

    def __init__(self) -> None:
        # spawn's semaphores are named (a fork-context one is unlinked at once and cannot be reopened)
        self._lock = multiprocessing.get_context("spawn").Lock()

    def __enter__(self) -> _ProcessLock:
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_S):
            raise TimeoutError(f"WeightSync: its cross-process lock has been held for {_LOCK_TIMEOUT_S:.0f} s, "
                               "so a process that held it died (killed mid-update?); build a new WeightSync "
                               "and restart the DataLoader workers")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __getstate__(self) -> tuple:
        semlock = self._lock._semlock  # type: ignore[attr-defined]
        return semlock.handle, semlock.kind, semlock.maxvalue, semlock.name

    def __setstate__(self, state: tuple) -> None:
        lock = multiprocessing.synchronize.Lock.__new__(multiprocessing.synchronize.Lock)
        lock.__setstate__(state)  # type: ignore[attr-defined]  # reopens the semaphore by its name
        self._lock = lock


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def check_unsharded(model, where: str) -> None:
    """Raise a ValueError naming the supported ways when `model` is sharded across ranks (FSDP, FSDP2's
    `fully_shard` or other DTensor parameters, a DeepSpeed engine or ZeRO-3 parameters): no rank holds the
    weights to score with, and its forward runs collectives that scoring (maybe in a prefetch thread) must not."""
    what = _sharding(model)
    if what is not None:
        raise ValueError(
            f"{where}: the learner is {what}, so this rank does not hold the weights to score with, and its forward "
            "runs collectives that scoring must not start. Score from a full copy instead: "
            "learner=curate.WeightSync(full) over an unsharded model of the same architecture, into which you load "
            "the gathered weights after optimizer steps (e.g. FSDP's full state dict, torch.distributed.checkpoint."
            "state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))) and then call "
            "sync.push(); or learner=curate.Actor(proxy, optimizer), an ACL actor: a small unsharded proxy model "
            "scored and trained in the learner's place"
        )


def _sharding(model) -> str | None:
    # DeepSpeed is not a dependency: its engine (an nn.Module wrapping the model) is known by its class's module
    if any(cls.__module__.partition(".")[0] == "deepspeed" for cls in type(model).__mro__):
        return f"a DeepSpeed engine ({type(model).__name__})"
    if not isinstance(model, nn.Module):
        return None
    # looked up, not imported (~1 s): a model can only be wrapped by, or hold tensors of, modules already imported
    fsdp, dtensor = sys.modules.get("torch.distributed.fsdp"), sys.modules.get("torch.distributed.tensor")
    if fsdp is not None and any(isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules()):
        return "FSDP-wrapped (FullyShardedDataParallel)"
    if dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters()):
        return "sharded: its parameters are DTensors (FSDP2's fully_shard, or tensor parallelism)"
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # the attribute deepspeed.zero.Init gives parameters
        return "partitioned by DeepSpeed ZeRO-3"
    return None


class WeightSync:
    """A scoring copy of the learner's weights, kept current as it trains; pass it as `learner=`.

    Push by hand with `sync.push()`, or `sync.attach(optimizer)` to push after every `every` optimizer
    steps. `version` counts pushes; `stats()` reports the steps the copy lags the learner by. In the
    owning process scoring reads the snapshot itself: a thread that scores while another pushes must
    hold `sync.lock` meanwhile (`Prefetch` does); worker processes score from a private, validated copy.

    Args:
        learner: the model being trained. Held by weak reference: the sync does not keep it alive, and a
            push after it was garbage-collected raises.
        every: `attach` pushes after every `every`-th optimizer step; scores then lag by < `every` steps.
        shared: keep the copy in CPU shared memory so that DataLoader workers (or any torch.multiprocessing
            child) that received this object score with the latest pushed weights.
        device: where the copy lives and scores; default the learner's device ("cpu" when shared).
        module: the scoring copy to sync into; default `copy.deepcopy(learner)`. It must have the learner's
            parameter and buffer names and shapes (dtypes may differ: a bf16 copy of an fp32 learner).
        dtype: the floating dtype of the copy, e.g. torch.bfloat16: half the memory of an fp32 learner's and a
            faster forward; pushes round the learner's weights to it, and `score_model` casts the inputs.
            Default: the dtypes of `module` (of the learner, for the default copy). Integer buffers stay as they are.
    """

    def __init__(self, learner: nn.Module, every: int = 1, shared: bool = False,
                 device: str | torch.device | None = None, module: nn.Module | None = None,
                 dtype: torch.dtype | None = None):
        if not isinstance(learner, nn.Module):
            raise TypeError(f"WeightSync: learner must be an nn.Module, got {type(learner).__name__}")
        check_unsharded(learner, "WeightSync")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"WeightSync: every must be a positive int (push every k optimizer steps), got {every=}")
        device = torch.device(device or ("cpu" if shared else model_device(learner)))
        if shared and device.type != "cpu":
            raise ValueError(f"WeightSync: shared=True keeps the copy in CPU shared memory for worker processes; "
                             f"device must be 'cpu', got device={str(device)!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"WeightSync: dtype must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, "
                             f"got {dtype=}")
        self.every, self.shared = every, shared
        self.module = (copy.deepcopy(learner) if module is None else module).to(device, dtype)
        self.module.eval().requires_grad_(False)
        for param in self.module.parameters():
            param.grad = None
        self._check_match(_tensors(learner))
        if shared:
            self.module.share_memory()
        self._meta = torch.zeros(3, dtype=torch.int64)  # seq (odd while writing), steps seen, step last pushed
        if shared:
            self._meta.share_memory_()
        self._learner: Callable[[], nn.Module | None] = weakref.ref(learner)  # a no-op lambda in workers
        self._owner = os.getpid()
        self._seqlock = _ProcessLock() if shared else None  # orders the weights' stores and loads across CPUs
        self._lock = threading.Lock()
        self._hook: RemovableHandle | None = None
        self._local: nn.Module | None = None  # a worker's private copy of the shared weights
        self._local_seq, self._local_step = 0, 0  # 0: no copy yet (seq is >= 2 after construction)
        self.push_seconds = 0.0
        self._copy(_tensors(learner))

    # ---- owner side -------------------------------------------------------------------------------

    @property
    def learner(self) -> nn.Module | None:
        """The model being trained (None once it was garbage-collected, and in worker processes)."""
        return self._learner()

    @property
    def lock(self) -> threading.Lock:
        """Held while the snapshot is read by a background scorer (`Prefetch`); `push` waits for it."""
        return self._lock

    def attach(self, optimizer: torch.optim.Optimizer) -> WeightSync:
        """Push after every `every`-th `optimizer.step()` (a step post-hook). Returns self."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"WeightSync.attach: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._hook is not None:
            raise RuntimeError("WeightSync.attach: already attached to an optimizer; call detach() first")
        self._hook = optimizer.register_step_post_hook(self._on_step)
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_step(self, optimizer, args, kwargs) -> None:
        self._meta[_STEPS] += 1
        if int(self._meta[_STEPS]) % self.every == 0:
            self.push()

    def push(self) -> int:
        """Copy the learner's current weights into the scoring copy; returns the new version."""
        if os.getpid() != self._owner:
            raise RuntimeError("WeightSync.push: only the process that owns the learner can push; workers only read")
        learner = self._learner()
        if learner is None:
            raise RuntimeError("WeightSync.push: the learner was garbage-collected; keep a reference to the model "
                               "you train, or detach() this WeightSync from its optimizer")
        source = _tensors(learner)
        self._check_match(source)  # before writing anything: a bad learner leaves the copy intact
        with self._lock:  # waits while a background scorer reads the copy
            self._copy(source)
        return self.version

    def _copy(self, source: dict[str, Tensor]) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            with self._counters():
                self._meta[_SEQ] += 1  # odd: a reader that saw the even value before will discard its copy
            for name, dst in _tensors(self.module).items():
                dst.copy_(source[name].detach(), non_blocking=dst.is_cuda)
            with self._counters():  # its release publishes the stores above with the even value
                self._meta[_SYNCED] = self._meta[_STEPS]
                self._meta[_SEQ] += 1
        self.push_seconds += time.perf_counter() - start

    def _counters(self):
        """Held while the seqlock's counters are read or written: across processes, the cross-process lock."""
        return self._seqlock if self._seqlock is not None else contextlib.nullcontext()

    def _check_match(self, source: dict[str, Tensor]) -> None:
        target = _tensors(self.module)
        if source.keys() != target.keys():
            missing, extra = sorted(source.keys() - target.keys()), sorted(target.keys() - source.keys())
            raise ValueError(f"WeightSync: the scoring copy does not match the learner: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}; pass module= a model of the learner's architecture")
        for name, tensor in source.items():
            if tensor.shape != target[name].shape:
                raise ValueError(f"WeightSync: parameter {name!r} has shape {tuple(tensor.shape)} in the learner but "
                                 f"{tuple(target[name].shape)} in the scoring copy; build the copy with the "
                                 "learner's architecture")

    # ---- reader side ------------------------------------------------------------------------------

    def scores(self, batch: dict, scorer, micro_batch_size: int = 1024) -> ModelScores:
        """Scores of `batch` from the latest pushed weights (the `ScoreProvider` protocol)."""
        return score_model(self.scoring_module(), batch, scorer, micro_batch_size)

    def scoring_module(self) -> nn.Module:
        """The module to score with in this process: the snapshot (owner) or a refreshed private copy (worker)."""
        if os.getpid() == self._owner:
            return self.module
        if not self.shared:
            raise RuntimeError("WeightSync: this copy is in another process and will never see a push; "
                               "use WeightSync(..., shared=True) to score in DataLoader workers")
        local = self._local
        if local is None:
            local = self._local = copy.deepcopy(self.module)  # private: forwards never read half-written weights
        self._refresh(local)
        return local

    def _refresh(self, local: nn.Module, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._counters():  # acquire: the loads below see every store published with this value
                seq, step = int(self._meta[_SEQ]), int(self._meta[_SYNCED])
            if seq == self._local_seq:
                return
            if seq % 2 == 0:
                with torch.no_grad():
                    for dst, src in zip(_tensors(local).values(), _tensors(self.module).values(), strict=True):
                        dst.copy_(src)
                with self._counters():  # release: the loads above are done before a later push may start
                    unchanged = int(self._meta[_SEQ]) == seq
                if unchanged:  # no push started meanwhile: the copy is whole
                    self._local_seq, self._local_step = seq, step
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"WeightSync: the weights have been mid-push for {timeout:.0f} s; "
                                   "did the training process die while pushing?")
            time.sleep(1e-4)

    @property
    def version(self) -> int:
        """Pushes so far (owner), or the version of the weights this worker last scored with (-1: none yet)."""
        seq = int(self._meta[_SEQ]) if os.getpid() == self._owner else self._local_seq
        return seq // 2 - 1  # the copy made at construction is version 0

    @property
    def steps(self) -> int:
        """Optimizer steps seen by the `attach` hook."""
        return int(self._meta[_STEPS])

    @property
    def synced_step(self) -> int:
        """The optimizer step whose weights this process scores with."""
        return int(self._meta[_SYNCED]) if os.getpid() == self._owner else self._local_step

    @property
    def staleness(self) -> int:
        """Optimizer steps the scoring weights lag the learner by (< `every` when attached)."""
        return self.steps - self.synced_step

    def stats(self) -> dict:
        return {"version": self.version, "steps": self.steps, "synced_step": self.synced_step,
                "staleness": self.staleness, "every": self.every, "push_seconds": self.push_seconds}

    # ---- pickling into workers --------------------------------------------------------------------

    def __getstate__(self) -> dict:
        if not self.shared:
            raise TypeError("WeightSync: an in-process copy (shared=False) cannot be sent to another process, where "
                            "it would never see a push; use WeightSync(..., shared=True) for DataLoader workers")
        state = dict(self.__dict__)
        # the learner, hook and lock stay with the owner; the shared tensors travel as handles
        state.update(_learner=None, _hook=None, _lock=None, _local=None, _local_seq=0)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if not self._meta.is_shared():
            raise TypeError("WeightSync: unpickled without shared memory (plain pickle or torch.save?); send it "
                            "through torch.multiprocessing / DataLoader workers, or build a new WeightSync")
        self._learner = lambda: None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WeightSync(version={self.version}, every={self.every}, shared={self.shared})"
