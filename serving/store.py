"""A model store: the model repository on networked storage, reached through fsspec.

``repository=`` (training) and ``fedserve-serve repository=`` take a local path or an fsspec URL
(``s3://bucket/prefix`` with s3fs; ``gs://``, ``az://``, ``memory://`` ... with their fsspec
packages: nothing here is S3-specific). Credentials and endpoints come from the store library's
standard environment and config files (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``, ``~/.aws/``; fsspec's ``FSSPEC_S3_*`` variables), never from the command line.

:class:`Store` is the few calls the repository makes, each turned into a :class:`StoreError` of
one line naming the URL, the call and the library's error on failure (:class:`StoreKeyMissing`
when the store says the object is not there). Keys are relative to the URL's path
(``"digits/3/model.onnx"``).

Every listing and every read asks the store: the filesystem is opened with fsspec's listing
cache off. With it on, s3fs answers ``cat_file``'s size lookup from cached listings and keeps
a cached listing of a directory below the one a listing refreshes, so a listing of a version
taken before its manifest was written hid that manifest for good ("file not found", no GET).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from serving.errors import StoreError, StoreKeyMissing

log = logging.getLogger(__name__)

T = TypeVar("T")
PROBE_PREFIX = ".fedserve-probe-"


def is_remote(location: str) -> bool:
    """True for an fsspec URL (``scheme://...``) other than ``file://``; False for a path."""
    return "://" in location and not location.startswith("file://")


@dataclass
class StoreConfig:
    """``serving.store.*``: how ``fedserve-serve`` follows a repository on a model store."""

    #: list the store at most this often (one LIST call, plus a GET per new file)
    poll_s: float = 1.0
    #: local copies of the served versions; null = ~/.cache/fedserve/<hash of the URL>
    cache_dir: str | None = None
    #: the cache's bound: least recently used versions no one serves are evicted beyond it
    cache_max_bytes: int = 10 * 2**30
    #: longest wait between two attempts while the store does not answer
    retry_max_s: float = 30.0


@dataclass(frozen=True)
class Entry:
    """One object of a listing: its size, a stamp that changes when it is rewritten (the ETag
    where the store has one, else its modification time) and its modification time (epoch s,
    None if the store does not say)."""

    size: int
    stamp: str
    mtime: float | None = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


class Store:
    """The fsspec filesystem and root path of a store URL."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        except ImportError as exc:  # the protocol's package is missing
            raise StoreError(f"model store {self.url}: {exc}") from None
        except ValueError as exc:
            raise StoreError(f"model store {self.url}: not a store URL ({exc})") from None
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``; any failure becomes one line naming the URL and ``what``:
        StoreKeyMissing for an object that is not there, StoreError for the rest."""
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except FileNotFoundError as exc:
            raise StoreKeyMissing(
                f"model store {self.url}: {what} failed: {_one_line(exc)}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - every store library has its own errors
            raise StoreError(f"model store {self.url}: {what} failed: {_one_line(exc)}") from None

    # ---- reading

    def listing(self, prefix: str = "", *, maxdepth: int | None = None) -> dict[str, Entry]:
        """Every object under ``prefix`` (``maxdepth`` levels deep): one recursive LIST on
        object stores."""
        path = self.path(prefix)
        found = self.call(f"list {path}", self.fs.find, path, maxdepth=maxdepth, detail=True)
        strip = len(self.root) + 1
        out = {}
        for name, info in found.items():
            if info.get("type", "file") != "file":
                continue
            out[name[strip:]] = Entry(int(info.get("size") or 0), _stamp(info), _mtime(info))
        return out

    def read(self, key: str) -> bytes:
        return self.call(f"read {self.path(key)}", self.fs.cat_file, self.path(key))

    def download(self, key: str, local: Path) -> None:
        self.call(f"download {self.path(key)}", self.fs.get_file, self.path(key), str(local))

    # ---- writing

    def write(self, key: str, data: bytes) -> None:
        """One object written whole (a single PUT on object stores)."""
        self.call(f"write {self.path(key)}", self.fs.pipe_file, self.path(key), data)

    def upload(self, local: Path, key: str) -> None:
        self.call(f"upload to {self.path(key)}", self.fs.put_file, str(local), self.path(key))

    def move(self, src: str, dst: str) -> None:
        """Server-side copy then delete on object stores (no rename there)."""
        self.call(f"move {self.path(src)}", self.fs.mv, self.path(src), self.path(dst))

    def remove(self, keys: Iterable[str]) -> None:
        paths = [self.path(k) for k in keys]
        if paths:
            self.call(f"delete {paths[0]} (+{len(paths) - 1})", self.fs.rm, paths)

    def check(self) -> None:
        """List the root, write a small probe object and delete it: a store that cannot be
        listed or written raises StoreError naming the failing call."""
        self.listing()
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        self.write(probe, b"fedserve write probe\n")
        with contextlib.suppress(StoreError):
            self.remove([probe])


def _stamp(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            return value.isoformat() if isinstance(value, datetime) else str(value)
    return ""


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None
