"""Crash-safe file writes: write *.partial, fsync, rename into place, fsync the directory."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's data, or (for a folder) make a rename/unlink inside it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see either the old file or the whole new one, never a torn one."""
    makedirs_durable(path.parent)
    # A unique partial name: two processes writing the same file never share a partial.
    partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates so the new entries survive a crash."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_path(folder.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (deepest first), e.g. metadata written by a library."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def durable_replace(src: Path, dst: Path) -> None:
    """Rename an already fsynced file into place and make the rename durable."""
    makedirs_durable(dst.parent)
    os.replace(src, dst)
    fsync_path(dst.parent)


@contextlib.contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), held for the block; waits for another holder.
    The kernel drops it when its process dies, so a killed holder never leaves it taken."""
    makedirs_durable(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
