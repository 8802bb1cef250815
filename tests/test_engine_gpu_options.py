"""The CUDA-path options of an engine, checked on the CPU: batch padding (one input shape per
engine), the cuDNN algorithm search option, and their config validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_helpers import IN_FEATURES, make_classifier

from serving.batching import pad_rows
from serving.engine import Engine
from serving.providers import CPU, CUDA, session_providers
from serving.settings import ServingConfig


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("gpu-options") / "clf.onnx", seed=2)


class ShapeRecorder:
    """Stands in for an InferenceSession: records the batch shapes it is run with."""

    def __init__(self, session: Any) -> None:
        self.session, self.shapes = session, []

    def run(self, names: Any, feeds: dict[str, np.ndarray], options: Any = None) -> Any:
        self.shapes.append(feeds["x"].shape)
        return self.session.run(names, feeds, options)


def test_padded_engine_runs_one_shape_and_returns_only_the_real_rows(model_path: Path) -> None:
    padded = Engine(model_path, max_batch_size=8, providers="cpu", pad_batches=True)
    plain = Engine(model_path, max_batch_size=8, providers="cpu", pad_batches=False)
    assert (padded.pad_to, plain.pad_to) == (8, 0)
    padded.session = recorder = ShapeRecorder(padded.session)  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    for rows in (1, 3, 8):
        x = rng.random((rows, IN_FEATURES), dtype=np.float32)
        got = padded.run({"x": x})["logits"]
        assert got.shape[0] == rows
        np.testing.assert_allclose(got, plain.run({"x": x})["logits"], rtol=1e-6)
    assert recorder.shapes == [(8, IN_FEATURES)] * 3


def test_auto_padding_is_off_on_the_cpu_and_for_unbatched_models(model_path: Path) -> None:
    assert Engine(model_path, max_batch_size=8, providers="cpu").pad_to == 0
    assert Engine(model_path, max_batch_size=0, providers="cpu", pad_batches=True).pad_to == 0
    with pytest.raises(ValueError, match="pad_batches must be true, false or auto, got 'yes'"):
        Engine(model_path, max_batch_size=8, providers="cpu", pad_batches="yes")


def test_pad_rows_repeats_the_last_row() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = pad_rows({"x": x}, 4)["x"]
    np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5], [3, 4, 5], [3, 4, 5]])
    assert pad_rows({"x": x}, 2)["x"] is x


def test_cuda_provider_gets_the_conv_algorithm_search_option() -> None:
    assert session_providers([CUDA, CPU]) == [
        (CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}),
        CPU,
    ]
    assert session_providers([CPU], "exhaustive") == [CPU]
    assert session_providers([CUDA], "Exhaustive")[0][1] == {"cudnn_conv_algo_search": "EXHAUSTIVE"}
    with pytest.raises(ValueError, match="cudnn_conv_algo_search must be one of .* got 'fast'"):
        session_providers([CUDA], "fast")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("pad_batches", "always", "serving.pad_batches must be true, false or auto, got 'always'"),
        ("cudnn_conv_algo_search", "fast", "serving.cudnn_conv_algo_search must be one of"),
    ],
)
def test_serving_settings_name_a_bad_gpu_option(key: str, value: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServingConfig(**{key: value}).validate()
    ServingConfig(pad_batches=False, cudnn_conv_algo_search="default").validate()
