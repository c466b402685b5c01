"""Durable file writes, for every layer: a file is whole or absent after a crash, and a
name is durable once its directory entry is synced."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_directory", "write_synced"]


def fsync_directory(directory: Path) -> None:
    """Make the names created or renamed in ``directory`` durable (its entries)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes | memoryview, sync: bool = True) -> None:
    """Create or replace ``path`` with ``data`` (mode 0640), fdatasync'd when ``sync``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file whole or not at all, durably: temporary name, fsync, rename, then
    fsync of the directory (the rename is only durable once its directory entry is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
