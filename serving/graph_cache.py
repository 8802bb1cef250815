"""Optimized graphs kept for reloads: a version evicted and loaded again skips graph optimization.

onnxruntime optimizes a model's graph every time it creates a session (``ORT_ENABLE_ALL``:
constant folding, fusions, the NCHWc layout for convolutions). Measured here for a ResNet-18, that
is 52 of the 68 ms a session takes to create: from its saved optimized graph, with optimizations
off, a session takes 16 ms, and its outputs are bit-identical and its runs as fast. An on-demand
server loads the same files again after every eviction (the scheduler benchmark: ~1,900 loads of
16 versions in a 270 s run), so a reload of a file saves its optimized graph here
(``optimized_model_filepath``) and later loads of the same file create their session from that.
A file's first load does not save: saving costs a second session creation (the saving session
holds the weights twice while it lives, so it is dropped and the saved graph loaded), which a
version loaded once, as an eager server loads each new round, would pay for nothing.

The cache belongs to this process: a temporary directory removed at exit by the process that made
it. A saved graph is specific to the machine (the NCHWc block size follows the CPU's vector width)
and to the onnxruntime version, so it is never shared or kept. Only CPU-only sessions use it (on
CUDA the optimized graph holds provider-specific nodes; not measured here), and only for a version
directory that holds its model file and the metadata alone: onnxruntime saves a reference to
external data relative to the saved graph, which would not find it. A file is known by its path and
the names, sizes, inodes and change times of its directory's files (``utime`` cannot set a change
time back), so a rewritten file gets a new entry; the entry it replaces is deleted, and beyond
``max_bytes`` (or ``MAX_FILES`` files remembered) the least recently used entries go. A graph is
saved under a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import onnxruntime as ort

from serving.layout import METADATA_FILE

log = logging.getLogger(__name__)

#: what the cache may hold on disk (the saved graphs are about their models' size)
MAX_CACHE_BYTES = 4 << 30
#: model files remembered (loaded once, or cached): a server publishing a round every few seconds
#: loads new files for as long as it runs
MAX_FILES = 4096


class GraphCache:
    """Where the optimized graph of a model file is kept (see the module docstring)."""

    _default: GraphCache | None = None
    _default_lock = threading.Lock()

    def __init__(self, root: Path, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        #: model path -> its current entry, least recently used first
        self._entries: OrderedDict[str, Path] = OrderedDict()
        #: entries asked for once: the next load of the same files saves its graph
        self._seen: set[Path] = set()

    @classmethod
    def default(cls) -> GraphCache:
        """This process's cache: a temporary directory, created at first use, removed at exit
        (by this process only: a forked child inherits the exit handler)."""
        with cls._default_lock:
            if cls._default is None:
                root = Path(tempfile.mkdtemp(prefix="fedserve-graphs-"))
                owner = os.getpid()

                def remove() -> None:
                    if os.getpid() == owner:
                        shutil.rmtree(root, ignore_errors=True)

                atexit.register(remove)
                log.info("optimized graphs of loaded models are kept in %s", root)
                cls._default = cls(root)
            return cls._default

    def entry(self, model_path: Path) -> Path | None:
        """The cache file for ``model_path`` as its directory holds it now (it may not exist
        yet); None when it cannot be cached (see the module docstring). An entry the directory's
        files no longer match is deleted."""
        try:
            with os.scandir(model_path.parent) as entries:
                files = sorted(
                    (e.name, st.st_size, st.st_ino, st.st_ctime_ns)
                    for e in entries
                    if e.is_file() or e.is_dir()
                    for st in [e.stat()]
                )
        except OSError:
            return None
        if {name for name, *_ in files} - {model_path.name, METADATA_FILE}:
            return None  # external data (or anything else) next to the model
        key = repr((str(model_path.resolve()), files, ort.__version__))
        entry = self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"
        with self._lock:
            previous = self._entries.pop(str(model_path), None)
            self._entries[str(model_path)] = entry
            forgotten = [previous] if previous is not None and previous != entry else []
            while len(self._entries) > MAX_FILES:  # the least recently used go
                forgotten.append(self._entries.popitem(last=False)[1])
            self._seen.difference_update(forgotten)
        for old in forgotten:
            old.unlink(missing_ok=True)
        return entry

    def reloading(self, entry: Path) -> bool:
        """Whether the files of ``entry`` were loaded before (so this load saves their graph);
        the first call for an entry records it and answers False."""
        with self._lock:
            if entry in self._seen:
                return True
            self._seen.add(entry)
            return False

    def discard(self, entry: Path) -> None:
        """Forget an entry that could not be loaded (a session is then made from the model)."""
        entry.unlink(missing_ok=True)

    @staticmethod
    def saving_name(entry: Path) -> Path:
        """A name to save ``entry`` under before it is renamed into place (unique per thread)."""
        return entry.with_name(f"{entry.stem}.{os.getpid()}.{threading.get_ident()}.saving")

    def commit(self, saving: Path, entry: Path) -> bool:
        """Rename a saved graph into place, then keep the cache within ``max_bytes``; False
        (only the next load's optimization is lost) when that fails."""
        try:
            os.replace(saving, entry)
        except OSError as exc:
            log.warning("cannot keep the optimized graph %s: %s", entry, exc)
            saving.unlink(missing_ok=True)
            return False
        self._trim(keep=entry)
        return True

    def _trim(self, keep: Path) -> None:
        with self._lock:
            entries = list(self._entries.items())
        sizes = {path: _size(entry) for path, entry in entries}
        total = sum(sizes.values())
        for path, entry in entries:  # least recently used first
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            entry.unlink(missing_ok=True)
            total -= sizes[path]
            with self._lock:
                if self._entries.get(path) == entry:
                    del self._entries[path]
                self._seen.discard(entry)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
