"""Claims: which `curate precompute` process is scoring which part, so that concurrent runs on one cache split
the shards instead of both scoring them.

A claim is a small JSON file next to the part (`.part-00003.parquet.claim`, hidden from `*.parquet`), holding its
owner (host, pid, the process's start time, a token). It is created whole and exclusively: written to a temp and
`os.link`ed to its name on a local or network filesystem (never seen empty, even if its writer is killed mid-write),
a PUT with `If-None-Match: *` on S3 (s3fs's `mode="create"`; AWS S3 honours it since 2024, as does moto; other
object stores may not, and there two runs can both win a claim). While its owner works a heartbeat thread refreshes
the claim every `timeout_s / 4` seconds, so a claim goes stale only when its owner stops: one whose owner is a dead
process on this host is taken over at once (a killed run's rerun goes on immediately), any other once it has not
been refreshed for `timeout_s` seconds (a process on another host that hung or died). Taking over is exclusive too:
locally under a `.takeover` lock file created with O_EXCL, on S3 a PUT with `If-Match` on the stale claim's ETag. A
run that finds a live claim leaves that part to its owner.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

from curate.files import stale_temps

__all__ = ["Claims"]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), which tells a reused pid from its first owner."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited; field 22 of stat is the start time


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    if not os.path.isdir("/proc"):  # no start times to compare: a live pid is taken to be the owner
        return True
    now = _start_time(pid)
    return now is not None and (started is None or now == started)


class Claims:
    """This process's claims on parts under one cache (local directory or fsspec remote).

    Args:
        fs: the cache's fsspec filesystem. timeout_s: a claim not refreshed for this long is taken over.
        log: where take-overs and lost claims are reported.
    Use as a context manager: on exit the heartbeat stops and the claims still held are released.
    """

    def __init__(self, fs, timeout_s: float = 600.0, log=print):
        if not timeout_s > 0:
            raise ValueError(f"precompute: the claim timeout must be > 0 seconds, got {timeout_s}")
        self.fs, self.timeout_s, self.log = fs, float(timeout_s), log
        self.local = "file" in fs.protocol
        pid = os.getpid()
        self.owner = {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
                      "token": uuid.uuid4().hex}
        self.held: dict[str, str | None] = {}  # claim path -> its ETag (S3) or None (local)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="precompute-claims", daemon=True)

    def __enter__(self) -> Claims:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for claim in list(self.held):
            self._release(claim)

    @staticmethod
    def path(part: str) -> str:
        head, name = posixpath.split(part)
        return posixpath.join(head, f".{name}.claim")

    def acquire(self, part: str) -> bool:
        """Claims `part`; False when a live claim of another process holds it."""
        claim = self.path(part)
        if self._claim(claim):
            if self.local:  # claim temps left by writers killed before their link (a live one's link now fails)
                for temp in stale_temps(claim):
                    _remove(temp)
            return True
        return False

    def _claim(self, claim: str) -> bool:
        if self._create(claim):
            return True
        found = self._read(claim)
        if found is None:  # released between our attempt and the read: try once more
            return self._create(claim)
        owner, age, etag = found
        if not self._stale(owner, age):
            return False
        if self._take_over(claim, owner, etag):
            why = ("damaged" if owner is None else "not running" if self._dead(owner)
                   else f"not refreshed for {age:.0f}s")
            self.log(f"precompute: took over {posixpath.basename(claim)} from {self._who(owner)} ({why})")
            return True
        return False

    def release(self, part: str) -> None:
        self._release(self.path(part))

    # --- one claim file ---

    def _payload(self) -> bytes:
        return json.dumps({**self.owner, "claimed_at": time.time()}).encode()

    def _create(self, claim: str) -> bool:
        if self.local:
            os.makedirs(posixpath.dirname(claim) or ".", exist_ok=True)  # the first claim comes before any part
            # written whole to a temp, then linked to the claim's name (exclusive and atomic): a claim is never seen
            # empty, even when its writer is killed mid-write (an O_EXCL create then a write could leave it so)
            head, name = posixpath.split(claim)
            temp = posixpath.join(head, f".{name}.{uuid.uuid4().hex[:12]}.tmp")  # what files.stale_temps finds
            try:
                with open(temp, "wb") as stream:
                    stream.write(self._payload())
                    stream.flush()
                    os.fsync(stream.fileno())
                os.link(temp, claim)
            except FileExistsError:
                return False
            except FileNotFoundError:  # the claim's holder cleared our temp as a dead writer's: the claim is taken
                return False
            finally:
                _remove(temp)
            etag = None
        else:
            try:
                self.fs.pipe_file(claim, self._payload(), mode="create")
            except FileExistsError:
                return False
            etag = self._etag(claim)
        with self._lock:
            self.held[claim] = etag
        return True

    def _read(self, claim: str) -> tuple[dict | None, float, str | None] | None:
        """(owner, or None for a damaged claim; age in seconds; ETag) or None when there is no claim."""
        try:
            if self.local:
                age = time.time() - os.stat(claim).st_mtime
                with open(claim, "rb") as stream:
                    raw = stream.read()
                etag = None
            else:
                self.fs.invalidate_cache(claim)
                info = self.fs.info(claim)
                age = time.time() - info["LastModified"].timestamp()
                raw, etag = self.fs.cat_file(claim), info.get("ETag")
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(raw)
        except ValueError:  # damaged: claims are never seen half-written
            owner = None
        return owner, age, etag

    def _dead(self, owner: dict | None) -> bool:
        return bool(owner) and owner.get("host") == self.owner["host"] and not _alive(int(owner["pid"]),
                                                                                      owner.get("started"))

    def _stale(self, owner: dict | None, age: float) -> bool:
        # claims are written whole (a local link of a finished temp, one PUT on S3): one without an owner is damaged
        return owner is None or self._dead(owner) or age > self.timeout_s

    @staticmethod
    def _who(owner: dict | None) -> str:
        return f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "an unknown process"

    def _take_over(self, claim: str, owner: dict | None, etag: str | None) -> bool:
        if not self.local:  # replaces exactly the stale version, or fails if anyone changed it since
            try:
                self.fs.pipe_file(claim, self._payload(), IfMatch=etag)
            except OSError:
                return False
            with self._lock:
                self.held[claim] = self._etag(claim)
            return True
        lock = claim + ".takeover"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another process is taking it over; one that died doing so is cleared later
            if self._age(lock) > self.timeout_s:
                _remove(lock)
            return False
        try:
            again = self._read(claim)
            if again is not None and (again[0] or {}).get("token") != (owner or {}).get("token"):
                return False  # someone else took it over between our read and our lock
            _remove(claim)
            return self._create(claim)
        finally:
            os.close(fd)
            _remove(lock)

    def _release(self, claim: str) -> None:
        with self._lock:
            held = self.held.pop(claim, "absent")
        if held == "absent":
            return
        found = self._read(claim)
        if found is not None and (found[0] or {}).get("token") == self.owner["token"]:  # never another's claim
            if self.local:
                _remove(claim)
            else:
                self.fs.rm_file(claim)

    def _etag(self, claim: str) -> str | None:
        self.fs.invalidate_cache(claim)
        return self.fs.info(claim).get("ETag")

    def _age(self, path: str) -> float:
        try:
            return time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return 0.0

    # --- the heartbeat ---

    def _beat(self) -> None:
        interval = max(0.05, min(self.timeout_s / 4, 30.0))
        while not self._stop.wait(interval):
            with self._lock:
                held = dict(self.held)
            for claim, etag in held.items():
                try:
                    self._refresh(claim, etag)
                except OSError as error:  # taken over (we were too slow) or the store failed: say so, go on
                    with self._lock:
                        self.held.pop(claim, None)
                    self.log(f"precompute: lost the claim {claim} ({type(error).__name__}: {error}); another run "
                             "may score that shard too (parts are written whole, so the cache stays correct)")

    def _refresh(self, claim: str, etag: str | None) -> None:
        if self.local:
            os.utime(claim)
            return
        self.fs.pipe_file(claim, self._payload(), IfMatch=etag)
        new: Any = self._etag(claim)
        with self._lock:
            if claim in self.held:
                self.held[claim] = new


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
