"""Durable file-system primitives: hashing, fsync'ed writes, atomic replace, locking.

Every write here is fsync'ed before it is relied on; :func:`atomic_write` leaves either the old or
the new content at ``path``, never half of it. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hash_fsync(src: Path, dst: Path) -> str:
    """Copy ``src`` to a new file ``dst`` in one pass, returning its sha256; fsync ``dst``."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def write_fsync(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (FileExistsError if it exists) and fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory, making renames and creations inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, tmp_prefix: str) -> None:
    """Write ``path`` by temp file + fsync + rename + fsync(dir): old or new, never half.

    The temp file is ``<tmp_prefix><pid>-<id>-<name>`` beside ``path``; it is removed on failure.
    """
    tmp = path.parent / f"{tmp_prefix}{os.getpid()}-{uuid.uuid4().hex}-{path.name}"
    try:
        write_fsync(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_path(path: Path) -> None:
    """Remove a file, symlink or directory tree; a missing path or rmtree error is ignored."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created 0644 if missing) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
