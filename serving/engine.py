"""One onnxruntime InferenceSession with chosen providers, warm-up and batch padding; engines
that share it; runs that can be stopped; and what the session costs in memory.

Providers (:mod:`serving.providers`): :attr:`Engine.providers` is what the session obtained
(``session.get_providers()``), not what was asked.

Sharing. :meth:`Engine.clone` makes another engine on the same session: onnxruntime's ``run`` is
thread-safe, and with one intra-op thread a run executes in the calling thread, so N engines on N
worker threads use N cores while the weights are held once. That is what lets engines move
between model versions at the cost of a thread, not of a session load (:mod:`serving.scheduler`).
With ``intra_op_threads`` > 1 the clones share the session's intra-op pool.

Stopping a run. Every run passes the engine's own ``RunOptions``; :meth:`Engine.terminate` sets its
``terminate`` flag from another thread (the watchdog), onnxruntime stops between kernels and the
run raises. The next run gets fresh options. Runs log below onnxruntime's fatal level only: a
request that makes a kernel fail is answered (and logged) by the worker, once.

Known-good input. :attr:`Engine.probe_feeds` is the warm-up's batch-1 input; :meth:`probe` runs it,
so a worker can tell a bad request (the probe passes) from a broken engine (it fails too).

Memory (:mod:`serving.memory_probe`): :attr:`session_memory` is the growth of the process's heap
in use (and of device memory on CUDA) while the session was created, at least the model files'
size; :attr:`run_memory` the growth during warm-up (:meth:`Engine.warmup_batches`), i.e. what
runs leave in onnxruntime's arena. On the CPU every run ends with arena shrinkage
(``memory.enable_memory_arena_shrinkage``), so what concurrent runs of several engines add is freed
when they end (measured: four concurrent 64-row CNN runs left 17.3 MB in the arena without it,
nothing with it, at the same speed): a version holds ``session + run`` however many engines it
has (:attr:`arena_shrinks`). On CUDA the device arena is not shrunk (freeing device memory
synchronises the device), so each engine may hold one run's activations.

Threads. ``intra_op_threads`` (default 1: the pool runs one engine per core). Sessions with >= 2
intra-op threads spin while idle and steal cores from the other engines and the event loop, so
spinning is off unless ``allow_spinning=True`` (``session.intra_op.allow_spinning = "0"``).

Signature. The engine serves a :class:`~serving.signature.ModelSignature`: the declared one
(checked against the graph's own names, datatypes and ranks) or, when none is given, the graph's.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.batching import pad_rows
from serving.datatypes import ort_to_v2
from serving.graph_cache import GraphCache
from serving.memory_probe import MemorySample
from serving.providers import CPU, CUDA, resolve_providers, session_providers
from serving.signature import ModelSignature
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)


class Engine:
    """One InferenceSession, or a clone sharing another engine's. :meth:`run` is thread-safe
    across engines; one engine runs one thing at a time (its worker's batch or an inline run)."""

    def __init__(
        self,
        model_path: str | Path,
        signature: ModelSignature | None = None,
        *,
        max_batch_size: int = 0,
        providers: str | Sequence[str] = "auto",
        intra_op_threads: int = 1,
        allow_spinning: bool = False,
        cudnn_conv_algo_search: str = "heuristic",
        pad_batches: bool | str = "auto",
        warmup: bool = True,
        name: str = "engine",
        graph_cache: GraphCache | None = None,
    ) -> None:
        self.name = name
        self.model_path = Path(model_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(intra_op_threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.requested_providers = resolve_providers(providers)
        initialize_runtime()
        chosen = session_providers(self.requested_providers, cudnn_conv_algo_search)
        entry = (
            graph_cache.entry(self.model_path)
            if graph_cache is not None and self.requested_providers == [CPU]
            else None
        )
        before = MemorySample.now()
        #: the graph the session was created from: the model file, or its cached optimized graph
        self.graph_path = self.model_path
        self.session = None  # type: ignore[assignment]
        if entry is not None and entry.exists():
            self.session = _create_from_cache(options, chosen, entry, graph_cache)
            if self.session is not None:
                self.graph_path = entry
        elif entry is not None and graph_cache is not None and graph_cache.reloading(entry):
            self.session = _create_saving(self.model_path, options, chosen, entry, graph_cache)
            if self.session is not None:
                self.graph_path = entry
        if self.session is None:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=chosen)
        created = MemorySample.now()
        grown = created.growth_since(before)
        self.session_memory = MemorySample(
            max(grown.host_bytes, _files_size(self.model_path)), grown.device_bytes
        )
        self.providers: list[str] = self.session.get_providers()
        if self.requested_providers[0] not in self.providers:
            log.warning(
                "%s asked for %s but obtained %s", name, self.requested_providers, self.providers
            )
        graph = graph_signature(self.session, max_batch_size)
        self.signature = signature or graph
        _check_against_graph(self.signature, graph, self.model_path)
        self.output_names = self.signature.output_names
        self.pad_to = self._pad_target(pad_batches)
        self.probe_feeds = self.signature.example_feeds(1) if warmup else {}
        self.arena_shrinks = self.providers[:1] != [CUDA]
        self._options = _run_options(self.arena_shrinks)
        self.warmup_seconds = 0.0
        self.run_memory = MemorySample(0, None if grown.device_bytes is None else 0)
        if warmup:
            self.warmup()
            self.run_memory = MemorySample.now().growth_since(created)

    def clone(self, name: str) -> Engine:
        """Another engine on this one's session (same signature, padding and warm-up input; no
        load, no warm-up; its own run options). Memory is this session's: count it once."""
        twin = object.__new__(Engine)
        for attr in _SHARED:
            setattr(twin, attr, getattr(self, attr))
        twin.name = name
        twin._options = _run_options(self.arena_shrinks)
        return twin

    def _pad_target(self, pad_batches: bool | str) -> int:
        """Rows every run is padded to: ``max_batch_size`` when padding is on, else 0.

        ``"auto"`` pads on the CUDA provider only. There every change of input shape costs a
        cuDNN set-up of each convolution (on an H200: ~44 ms per change for ResNet-18 against
        1.3 ms for a whole 64-row run, benchmarks/gpu_conv_search.py), and dynamic batching
        changes the shape almost every run under batch-1 load; one shape per engine removes
        that. On the CPU the padded rows would cost their compute and a shape change costs
        nothing, so padding is off."""
        if self.signature.max_batch_size <= 1:
            return 0
        if pad_batches == "auto":
            pad = self.providers[:1] == [CUDA]
        elif isinstance(pad_batches, bool):
            pad = pad_batches
        else:
            raise ValueError(f"pad_batches must be true, false or auto, got {pad_batches!r}")
        return self.signature.max_batch_size if pad else 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the session; outputs by name. Feeds are assumed validated (equal batch dims).
        Raises onnxruntime's error, also when :meth:`terminate` stopped the run."""
        options = self._options
        if options.terminate:  # the previous run was stopped: these options stay stopped
            options = self._options = _run_options(self.arena_shrinks)
        rows = next(iter(feeds.values())).shape[0] if self.pad_to and feeds else 0
        if rows and rows < self.pad_to:
            values = self.session.run(self.output_names, pad_rows(feeds, self.pad_to), options)
            values = [v[:rows] for v in values]
        else:
            values = self.session.run(self.output_names, feeds, options)
        return dict(zip(self.output_names, values, strict=True))

    def terminate(self) -> None:
        """Stop this engine's current run (thread-safe; onnxruntime checks between kernels)."""
        self._options.terminate = True

    def probe(self) -> None:
        """Run the known-good warm-up input (batch 1); raises what the engine raises."""
        self.run(self.probe_feeds or self.signature.example_feeds(1))

    def warmup(self) -> None:
        """Runs at the batch sizes :meth:`warmup_batches` names (allocations, kernel set-up)."""
        t0 = time.perf_counter()
        for n in self.warmup_batches():
            self.run(self.signature.example_feeds(n))
        self.warmup_seconds = time.perf_counter() - t0

    def warmup_batches(self) -> list[int]:
        """Batch 1, and on CUDA also ``max_batch_size``: there the first run of a shape sets up
        cuDNN for every convolution (tens of ms). On the CPU a shape's first run costs little
        more than the next (a 64-row run after a 1-row warm-up, measured: CNN 26 vs 19-23 ms,
        ResNet-18 55 vs 52) while a max-batch warm-up adds its whole run to every load (CNN
        24 ms of a 39 ms load, ResNet-18 59 of 160), which on-demand loading pays at every
        cold start."""
        if self.providers[:1] == [CUDA] and self.signature.max_batch_size > 1:
            return [1, self.signature.max_batch_size]
        return [1]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _create_from_cache(
    options: ort.SessionOptions, providers: list[Any], entry: Path, cache: GraphCache | None
) -> ort.InferenceSession | None:
    """A session from a cached optimized graph, its optimizations off; None (the entry dropped)
    when it cannot be created, and the caller loads the model file."""
    level = options.graph_optimization_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(entry), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - the model file is the fallback
        log.warning("cannot load the cached optimized graph %s (%s); loading the model", entry, exc)
        if cache is not None:
            cache.discard(entry)
        options.graph_optimization_level = level
        return None


def _create_saving(
    model_path: Path,
    options: ort.SessionOptions,
    providers: list[Any],
    entry: Path,
    cache: GraphCache,
) -> ort.InferenceSession | None:
    """Optimize ``model_path`` once to save its graph as ``entry`` (see
    :mod:`serving.graph_cache`), then return a session created from that graph. The saving
    session is dropped: it holds a second copy of the weights for as long as it lives (measured:
    13.3 MB for a 6.8 MB CNN session), which the memory measurement would count. None when
    saving fails, and the caller loads the model file."""
    saving = cache.saving_name(entry)
    save_options = ort.SessionOptions()
    save_options.graph_optimization_level = options.graph_optimization_level
    save_options.intra_op_num_threads = options.intra_op_num_threads
    save_options.optimized_model_filepath = str(saving)
    # onnxruntime warns that an NCHWc graph is specific to this machine: the cache is this process's
    save_options.log_severity_level = 3
    try:
        ort.InferenceSession(str(model_path), save_options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - the caller's load of the model file reports a bad model
        saving.unlink(missing_ok=True)
        log.info("not caching the optimized graph of %s: %s", model_path, exc)
        return None
    if not saving.exists() or not cache.commit(saving, entry):
        return None
    return _create_from_cache(options, providers, entry, cache)


#: what a clone shares with the engine it was made from
_SHARED = (
    "model_path",
    "graph_path",
    "requested_providers",
    "session",
    "session_memory",
    "run_memory",
    "providers",
    "signature",
    "output_names",
    "pad_to",
    "probe_feeds",
    "warmup_seconds",
    "arena_shrinks",
)


@functools.cache
def initialize_runtime() -> None:
    """Create and run one trivial session, once per process: onnxruntime sets up its environment
    (thread pools, allocators; ~9 MB here) with the first session, which would otherwise be
    counted to the first model's measured memory."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "init",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, np.float32)})


def _run_options(shrink_cpu_arena: bool) -> ort.RunOptions:
    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only: a failing run is reported by the worker
    if shrink_cpu_arena:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _files_size(model_path: Path) -> int:
    """Bytes of the model file and of every file beside it (external data)."""
    try:
        return sum(p.stat().st_size for p in model_path.parent.iterdir() if p.is_file())
    except OSError:
        return 0


#: a source location and the C++ function signature after it, in onnxruntime's messages
_SOURCE = re.compile(
    r"\S+\.(?:h|hpp|cc|cpp|cu|cuh|c):\d+\s+(?:[^()\s]*?[^()]*\([^()]*\)(?: const)?\s+)?"
)


def describe_error(exc: BaseException) -> str:
    """onnxruntime's message for ``exc`` without source paths and C++ signatures (what a client
    may read), on one line."""
    text = _SOURCE.sub("", str(exc)).strip()
    return " ".join(text.split()) or type(exc).__name__


def graph_signature(session: ort.InferenceSession, max_batch_size: int) -> ModelSignature:
    """The signature of a session's graph (symbolic dims become -1)."""

    def specs(args: Sequence[Any]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(
                a.name,
                ort_to_v2(a.type),
                tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape),
            )
            for a in args
        )

    return ModelSignature(specs(session.get_inputs()), specs(session.get_outputs()), max_batch_size)


def _check_against_graph(sig: ModelSignature, graph: ModelSignature, path: Path) -> None:
    """The declared specs must name the graph's inputs/outputs with the same datatypes and ranks."""
    for kind, declared, actual in (
        ("input", sig.inputs, graph.inputs),
        ("output", sig.outputs, graph.outputs),
    ):
        by_name = {s.name: s for s in actual}
        for spec in declared:
            real = by_name.get(spec.name)
            if real is None:
                raise ValueError(
                    f"{path}: declared {kind} '{spec.name}' is not in the ONNX graph "
                    f"(graph has {', '.join(by_name) or 'none'})"
                )
            if real.datatype != spec.datatype or len(real.shape) != len(spec.shape):
                raise ValueError(
                    f"{path}: declared {kind} {spec.describe()} disagrees with the graph's "
                    f"{real.describe()}"
                )
        if kind == "input" and {s.name for s in declared} != set(by_name):
            raise ValueError(
                f"{path}: declared inputs {[s.name for s in declared]} differ from the graph's "
                f"{list(by_name)}"
            )
