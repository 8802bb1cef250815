"""Which onnxruntime execution providers an engine asks for, and with which options.

``"auto"`` asks for the CUDA execution provider first when
``onnxruntime.get_available_providers()`` lists it *and* a probe session actually obtains it
(onnxruntime-gpu lists CUDA even without a GPU or CUDA libraries and then falls back to CPU
silently), else CPU only. The CUDA provider gets ``cudnn_conv_algo_search`` (see
:func:`session_providers`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@functools.cache
def cuda_usable() -> bool:
    """True when a CUDA session can actually be created here (probed once per process)."""
    if CUDA not in ort.get_available_providers():
        return False
    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")):
        log.info("onnxruntime lists CUDA but this machine has no NVIDIA driver; serving on CPU")
        return False
    if hasattr(ort, "preload_dlls"):
        # CUDA/cuDNN from pip's nvidia-* wheels: a serving process never imports torch, which is
        # what would otherwise have loaded them; missing libraries make the probe below fail
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable GPU"
        log.info("CUDA execution provider unusable: %s", exc)
        return False
    ok = CUDA in session.get_providers()
    if not ok:
        log.info("CUDA execution provider listed but not obtained; serving on CPU")
    return ok


def resolve_providers(preference: str | Sequence[str] = "auto") -> list[str]:
    """``"auto"``: CUDA then CPU when CUDA works, else CPU; ``"cpu"``; ``"cuda"``; or a list of
    onnxruntime provider names (those not available here are dropped with a warning)."""
    if isinstance(preference, str):
        pref = preference.lower()
        if pref == "auto":
            return [CUDA, CPU] if cuda_usable() else [CPU]
        if pref == "cpu":
            return [CPU]
        if pref in ("cuda", "gpu"):
            return [CUDA, CPU]
        preference = [preference]
    available = ort.get_available_providers()
    chosen = [p for p in preference if p in available]
    dropped = [p for p in preference if p not in available]
    if dropped:
        log.warning("providers %s not available here (available: %s)", dropped, available)
    return chosen or [CPU]


#: cuDNN convolution algorithm search of the CUDA provider (its option ``cudnn_conv_algo_search``)
CONV_ALGO_SEARCHES = ("heuristic", "exhaustive", "default")


def session_providers(
    providers: Sequence[str], conv_algo_search: str = "heuristic"
) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` as onnxruntime takes them, with the CUDA provider's options.

    Why ``heuristic`` by default: onnxruntime's CUDA provider defaults to ``EXHAUSTIVE``, which
    benchmarks every cuDNN algorithm for each convolution the first time it sees an input shape.
    Dynamic batching makes up to ``max_batch_size`` shapes per model, so under batch-1 load the
    engines keep meeting new shapes and each costs a search (measured on an H200, see
    benchmarks/README.md); ``HEURISTIC`` asks cuDNN for its choice instead, in microseconds."""
    search = conv_algo_search.lower()
    if search not in CONV_ALGO_SEARCHES:
        raise ValueError(
            f"serving.cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCHES)}, "
            f"got {conv_algo_search!r}"
        )
    return [(p, {"cudnn_conv_algo_search": search.upper()}) if p == CUDA else p for p in providers]


def default_instances(providers: Sequence[str]) -> int:
    """Engines per model version when ``serving.instances`` is unset: one per usable core on CPU
    (each engine runs 1 intra-op thread), 2 on a GPU (overlaps host work with device work)."""
    if providers and providers[0] == CUDA:
        return 2
    return usable_cores()


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
