"""One writer per output folder: OUT/.vlpcache.lock names the job that owns OUT (host, pid, start time).

Two jobs on one OUT would delete each other's partial shards and could commit one job's ledger over the
other's files, so a second job is refused at once. The owner renews a lease every lease/3 seconds; a
lock whose pid is gone on this host, or whose lease expired (the owner's host went away), is stale and
taken over with a warning. Taking over renames the stale file first: of two jobs racing for one stale
lock, only one rename succeeds.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".vlpcache.lock"


class LockHeld(ConfigError):
    """Another live job owns the output folder."""


@dataclass
class Owner:
    host: str
    pid: int
    started: str  # ISO time the job took the lock
    proc_start: float  # the process's start time (tells a reused pid apart)
    lease_until: float  # epoch seconds; renewed while the job runs
    token: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, running since {self.started}"


def _proc_start(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return -1.0


def _stale_reason(owner: Owner) -> str | None:
    """Why `owner` no longer holds the lock, or None while it does."""
    if owner.host == socket.gethostname():
        start = _proc_start(owner.pid)
        if start < 0:
            return f"its process {owner.pid} is gone"
        if abs(start - owner.proc_start) > 1.0:
            return f"pid {owner.pid} now belongs to another process"
        return None
    if time.time() > owner.lease_until:
        return f"its lease expired {time.time() - owner.lease_until:.0f} s ago"
    return None


class OutLock:
    """Context manager: hold OUT's lock for the duration of a job."""

    def __init__(self, out: str | Path, lease_s: float = 60.0) -> None:
        self.path = Path(out) / LOCK_FILE
        self.lease_s = lease_s
        self.owner = Owner(socket.gethostname(), os.getpid(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           _proc_start(os.getpid()), 0.0, uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_out = False

    def __enter__(self) -> OutLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._made_out = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock taken over by another job in between: look again
            if self._create():
                self._thread = threading.Thread(target=self._renew, name="vlpcache-lock", daemon=True)
                self._thread.start()
                return
            current = self._read()
            if current is None:
                continue
            reason = _stale_reason(current)
            if reason is None:
                raise LockHeld(f"{self.path.parent} is being written by another job ({current.describe()}); "
                               f"wait for it to finish, or stop it, then rerun (lock file {self.path})")
            log.warning("taking over the stale lock of %s (%s): %s", self.path.parent, current.describe(), reason)
            try:
                os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{self.owner.token}"))
            except FileNotFoundError:
                continue  # another job took it over first
            self.path.with_name(f"{LOCK_FILE}.stale-{self.owner.token}").unlink()
        raise LockHeld(f"could not take the lock {self.path}: other jobs keep taking it")

    def _create(self) -> bool:
        self.owner.lease_until = time.time() + self.lease_s
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.owner), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> Owner | None:
        try:
            return Owner(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:  # torn by a crash between create and write: nobody holds it
            log.warning("unreadable lock file %s (%s): treating it as stale", self.path, e)
            return Owner("?", -1, "?", -1.0, 0.0, "?")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.owner.lease_until = time.time() + self.lease_s
            partial = self.path.with_name(f"{LOCK_FILE}.{self.owner.token}.partial")
            try:
                current = self._read()
                if current is None or current.token != self.owner.token:
                    log.error("the lock %s was taken by another job (%s)", self.path, current and current.describe())
                    return
                partial.write_text(json.dumps(asdict(self.owner)))
                os.replace(partial, self.path)
            except OSError as e:  # a full disk: the lease lapses; the pid check still protects this host
                partial.unlink(missing_ok=True)
                log.warning("could not renew the lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        if self._made_out and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()  # a job that wrote nothing leaves no folder behind
