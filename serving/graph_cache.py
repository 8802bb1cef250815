"""Optimized graphs kept for reloads: a version evicted and loaded again skips graph optimization.

onnxruntime optimizes a model's graph every time it creates a session (``ORT_ENABLE_ALL``:
constant folding, fusions, the NCHWc layout for convolutions). Measured here for a ResNet-18, that
is 52 of the 68 ms a session takes to create: from its saved optimized graph, with optimizations
off, a session takes 16 ms, and its outputs are bit-identical and its runs as fast. An on-demand
server loads the same files again after every eviction (the scheduler benchmark: ~1,900 loads of
16 versions in a 270 s run), so the first session of a file saves its optimized graph
(``optimized_model_filepath``) here and later sessions of the same file load that.

The cache belongs to this process: a temporary directory removed at exit. A saved graph is specific
to the machine (the NCHWc block size follows the CPU's vector width) and to the onnxruntime
version, so it is never shared or kept. Only CPU-only sessions use it (on CUDA the optimized graph
holds provider-specific nodes; not measured here). A file is known by the names, sizes and
modification times of its version directory's files, so a changed file gets a new entry. A graph is
saved under a temporary name and renamed, so a reader never sees half of one. Models whose files
exceed ``MAX_MODEL_BYTES`` are not cached (a saved graph over 2 GB needs external data).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

#: models whose version directory holds more than this are not cached
MAX_MODEL_BYTES = 1 << 30


class GraphCache:
    """Where the optimized graph of a model file is kept (see the module docstring)."""

    _default: GraphCache | None = None
    _default_lock = threading.Lock()

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def default(cls) -> GraphCache:
        """This process's cache: a temporary directory, created at first use, removed at exit."""
        with cls._default_lock:
            if cls._default is None:
                root = Path(tempfile.mkdtemp(prefix="fedserve-graphs-"))
                atexit.register(shutil.rmtree, root, ignore_errors=True)
                log.info("optimized graphs of loaded models are kept in %s", root)
                cls._default = cls(root)
            return cls._default

    def entry(self, model_path: Path) -> Path | None:
        """The cache file for ``model_path`` as its directory holds it now (it may not exist
        yet); None when the files cannot be read or are too large to cache."""
        try:
            with os.scandir(model_path.parent) as entries:
                files = sorted(
                    (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()
                )
        except OSError:
            return None
        if sum(size for _, size, _ in files) > MAX_MODEL_BYTES:
            return None
        key = repr((str(model_path.resolve()), files, ort.__version__))
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"

    @staticmethod
    def saving_name(entry: Path) -> Path:
        """A name to save ``entry`` under before it is renamed into place (unique per thread)."""
        return entry.with_name(f"{entry.stem}.{os.getpid()}.{threading.get_ident()}.saving")

    @staticmethod
    def commit(saving: Path, entry: Path) -> None:
        """Rename a saved graph into place; a failure only costs the next load its optimization."""
        try:
            os.replace(saving, entry)
        except OSError as exc:
            log.warning("cannot keep the optimized graph %s: %s", entry, exc)
            saving.unlink(missing_ok=True)
