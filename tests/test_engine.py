"""Engine: providers obtained, warm-up, parity with onnxruntime, and input validation messages."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from serving_helpers import CLASSES, IN_FEATURES, classifier_weights, make_classifier, make_cnn

from serving.engine import Engine
from serving.errors import InputError
from serving.graph_cache import GraphCache
from serving.providers import CPU, resolve_providers
from serving.signature import ModelSignature
from serving.tensor_spec import TensorSpec


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("engine") / "clf.onnx", seed=1)


def signature(max_batch: int = 8, allow: tuple[str, ...] = ()) -> ModelSignature:
    return ModelSignature.build(
        [TensorSpec("x", "FP32", (-1, IN_FEATURES))],
        [TensorSpec("logits", "FP32", (-1, CLASSES))],
        max_batch,
        allow_nonfinite=allow,
    )


def test_engine_reports_obtained_providers_and_matches_onnxruntime(model_path: Path) -> None:
    engine = Engine(model_path, signature(), providers="auto", intra_op_threads=1, name="e0")
    assert engine.providers == engine.session.get_providers()
    assert engine.providers[-1] == CPU
    assert engine.warmup_seconds > 0
    x = np.random.default_rng(0).random((5, IN_FEATURES), dtype=np.float32)
    ref = ort.InferenceSession(str(model_path), providers=[CPU]).run(None, {"x": x})[0]
    np.testing.assert_allclose(engine.run({"x": x})["logits"], ref, rtol=1e-6)
    w, b = classifier_weights(1)
    np.testing.assert_allclose(engine.run({"x": x})["logits"], x @ w + b, rtol=1e-5, atol=1e-5)


def test_warmup_runs_batch_1_on_the_cpu(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: every load also ran a max-batch warm-up, which on the CPU added its whole run to
    each cold start (24 ms of a CNN's 39 ms) to save a few ms on the first big batch."""
    shapes: list[int] = []
    run = Engine.run

    def counting_run(self: Engine, feeds: dict) -> dict:
        shapes.append(next(iter(feeds.values())).shape[0])
        return run(self, feeds)

    monkeypatch.setattr(Engine, "run", counting_run)
    engine = Engine(model_path, signature(max_batch=64), providers="cpu", name="e0")
    assert engine.providers[:1] == [CPU]
    assert shapes == [1]
    assert engine.warmup_seconds > 0


def test_a_reload_creates_its_session_from_the_cached_optimized_graph(tmp_path: Path) -> None:
    """Before: every load optimized the graph again (for a ResNet-18, 52 of the 68 ms a session
    takes to create here), and an on-demand server reloads the same files after every
    eviction. A first load does not save (an eager server loads each version once); the first
    reload saves, and later reloads load the saved graph."""
    cache = GraphCache(tmp_path / "cache")
    cache.root.mkdir()
    path = make_classifier(tmp_path / "v1" / "model.onnx", seed=1)
    x = np.random.default_rng(0).random((5, IN_FEATURES), dtype=np.float32)
    first = Engine(path, signature(), providers="cpu", graph_cache=cache)
    assert first.graph_path == path and list(cache.root.iterdir()) == []
    reload = Engine(path, signature(), providers="cpu", graph_cache=cache)
    saved = list(cache.root.iterdir())
    assert [p.suffix for p in saved] == [".onnx"]
    assert reload.graph_path == saved[0]  # optimized once more, saved, loaded from there
    again = Engine(path, signature(), providers="cpu", graph_cache=cache)
    assert again.graph_path == saved[0]
    np.testing.assert_array_equal(again.run({"x": x})["logits"], first.run({"x": x})["logits"])
    # the file changes (a new round's weights): never the old graph, which is deleted
    time.sleep(0.01)
    make_classifier(path, seed=2)
    changed = [Engine(path, signature(), providers="cpu", graph_cache=cache) for _ in range(2)]
    assert changed[0].graph_path == path
    w, b = classifier_weights(2)
    for engine in changed:
        np.testing.assert_allclose(engine.run({"x": x})["logits"], x @ w + b, rtol=1e-5, atol=1e-5)
    assert list(cache.root.iterdir()) == [changed[1].graph_path]


def test_the_load_that_saves_the_graph_measures_one_copy_of_the_weights(tmp_path: Path) -> None:
    """Before: the session that saved the optimized graph was kept, and it holds a second copy
    of the weights for its whole life (13.3 MB for a 6.8 MB CNN session), so a version's
    measurement doubled: reloads reserved twice its size, and a version could be refused as
    larger than the budget."""
    path = make_cnn(tmp_path / "v1" / "model.onnx")
    cache = GraphCache(tmp_path / "cache")
    cache.root.mkdir()
    first = Engine(path, None, max_batch_size=8, providers="cpu", graph_cache=cache)
    plain = first.session_memory.host_bytes
    saving = Engine(path, None, max_batch_size=8, providers="cpu", graph_cache=cache)
    assert first.graph_path == path and saving.graph_path.parent == cache.root
    assert saving.session_memory.host_bytes < 1.3 * plain


def test_a_model_with_external_data_is_not_cached(tmp_path: Path) -> None:
    """onnxruntime saves the external-data reference relative to the saved graph, which would not
    find it: every reload of such a version failed."""
    w, b = classifier_weights(1)
    model = onnx.load(str(make_classifier(tmp_path / "src.onnx", seed=1)))
    (tmp_path / "v1").mkdir()
    onnx.save(
        model,
        str(tmp_path / "v1" / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    cache = GraphCache(tmp_path / "cache")
    cache.root.mkdir()
    x = np.ones((2, IN_FEATURES), np.float32)
    for _ in range(2):
        engine = Engine(tmp_path / "v1" / "model.onnx", signature(), graph_cache=cache)
        assert engine.graph_path == tmp_path / "v1" / "model.onnx"
        np.testing.assert_allclose(engine.run({"x": x})["logits"], x @ w + b, rtol=1e-5)
    assert list(cache.root.iterdir()) == []


def test_a_cached_graph_that_cannot_be_loaded_is_dropped(tmp_path: Path) -> None:
    cache = GraphCache(tmp_path / "cache")
    cache.root.mkdir()
    path = make_classifier(tmp_path / "v1" / "model.onnx", seed=1)
    Engine(path, signature(), providers="cpu", graph_cache=cache)
    entry = Engine(path, signature(), providers="cpu", graph_cache=cache).graph_path
    assert entry.parent == cache.root
    entry.write_bytes(b"not a graph")
    engine = Engine(path, signature(), providers="cpu", graph_cache=cache)
    assert engine.graph_path == path and not entry.exists()
    again = Engine(path, signature(), providers="cpu", graph_cache=cache)
    assert again.graph_path == entry  # saved again


def test_the_cache_keeps_within_its_size_least_recently_used_first(tmp_path: Path) -> None:
    paths = [make_classifier(tmp_path / f"v{i}" / "model.onnx", seed=i) for i in range(3)]
    cache = GraphCache(tmp_path / "cache", max_bytes=1)
    cache.root.mkdir()
    entries = [[Engine(p, signature(), graph_cache=cache) for _ in range(2)] for p in paths]
    assert list(cache.root.iterdir()) == [entries[-1][1].graph_path]  # only the newest fits


def test_the_cache_remembers_a_bounded_number_of_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that publishes a round every few seconds loads new files for as long as it runs:
    what the cache remembers of files loaded once stays bounded."""
    monkeypatch.setattr("serving.graph_cache.MAX_FILES", 2)
    cache = GraphCache(tmp_path / "cache")
    cache.root.mkdir()
    paths = [make_classifier(tmp_path / f"v{i}" / "model.onnx", seed=i) for i in range(3)]
    saved = [Engine(paths[0], signature(), graph_cache=cache) for _ in range(2)][1].graph_path
    assert saved.exists()
    for p in paths[1:]:
        Engine(p, signature(), graph_cache=cache)  # loaded once each: v0 is forgotten
    assert not saved.exists()
    again = Engine(paths[0], signature(), graph_cache=cache)
    assert again.graph_path == paths[0]  # a first load again: it does not save


def test_a_graph_that_cannot_be_saved_still_loads(tmp_path: Path) -> None:
    cache = GraphCache(tmp_path / "missing")  # saving fails: no such directory
    path = make_classifier(tmp_path / "v1" / "model.onnx", seed=1)
    Engine(path, signature(), providers="cpu", graph_cache=cache)
    engine = Engine(path, signature(), providers="cpu", graph_cache=cache)  # tries to save
    assert engine.graph_path == path
    x = np.ones((1, IN_FEATURES), np.float32)
    w, b = classifier_weights(1)
    np.testing.assert_allclose(engine.run({"x": x})["logits"], x @ w + b, rtol=1e-5, atol=1e-5)
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(Exception, match="(?i)protobuf|pars"):  # a bad model fails as before
        Engine(tmp_path / "v2" / "model.onnx", signature(), graph_cache=cache)


def test_signature_from_graph_and_mismatch_detected(model_path: Path) -> None:
    engine = Engine(model_path, None, max_batch_size=4, warmup=False)
    assert engine.signature.inputs == (TensorSpec("x", "FP32", (-1, IN_FEATURES)),)
    assert engine.signature.max_batch_size == 4
    bad = ModelSignature.build(
        [TensorSpec("y", "FP32", (-1, 4))], [TensorSpec("logits", "FP32", (-1, 3))], 4
    )
    with pytest.raises(ValueError, match="declared input 'y' is not in the ONNX graph"):
        Engine(model_path, bad, warmup=False)
    wrong_type = ModelSignature.build(
        [TensorSpec("x", "FP64", (-1, 4))], [TensorSpec("logits", "FP32", (-1, 3))], 4
    )
    with pytest.raises(ValueError, match="disagrees with the graph"):
        Engine(model_path, wrong_type, warmup=False)


def test_resolve_providers() -> None:
    assert resolve_providers("cpu") == [CPU]
    assert resolve_providers(["NoSuchExecutionProvider"]) == [CPU]
    auto = resolve_providers("auto")
    assert auto[-1] == CPU and set(auto) <= set(ort.get_available_providers())


@pytest.mark.parametrize(
    ("feeds", "needle"),
    [
        ({"y": np.zeros((1, 4), np.float32)}, "unknown input 'y'; the model expects x: FP32 [-1, 4]"),  # noqa: E501
        ({"x": np.zeros((1, 4), np.float64)}, "input 'x': datatype FP64 does not match the model's x: FP32 [-1, 4]"),  # noqa: E501
        ({"x": np.zeros((1, 5), np.float32)}, "input 'x': shape [1, 5] does not match the model's x: FP32 [-1, 4]"),  # noqa: E501
        ({"x": np.zeros((4,), np.float32)}, "input 'x': shape [4] does not match"),
        ({"x": np.zeros((9, 4), np.float32)}, "input 'x': batch size 9 is outside 1..8 (max_batch_size)"),  # noqa: E501
        ({"x": np.zeros((0, 4), np.float32)}, "batch size 0 is outside 1..8"),
        ({"x": np.array([[0, np.nan, 0, 0]], np.float32)}, "input 'x': contains NaN or Inf"),
        ({"x": np.array([[0, np.inf, 0, 0]], np.float32)}, "x: FP32 [-1, 4]"),
        ({}, "missing input(s): x: FP32 [-1, 4]"),
    ],
)  # fmt: skip
def test_validation_messages(feeds: dict, needle: str) -> None:
    with pytest.raises(InputError) as info:
        signature().validate(feeds)
    assert needle in str(info.value)
    assert info.value.status == 400


def test_validation_accepts_good_input_and_allowed_nan() -> None:
    assert signature().validate({"x": np.zeros((3, 4), np.float32)}) == 3
    nan = {"x": np.full((2, 4), np.nan, np.float32)}
    assert signature(allow=("x",)).validate(nan) == 2


def test_serving_never_imports_torch_or_flwr() -> None:
    import subprocess
    import sys

    code = (
        "import sys, serving.api, serving.cli, serving.watcher, serving.pool, serving.metrics; "
        "bad = [m for m in ('torch', 'flwr') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_datatype_numpy_lacks_is_a_clear_error() -> None:
    """BF16 has no numpy dtype: warm-up refuses the model, a request gets a 400 (both were a
    KeyError before)."""
    sig = ModelSignature.build(
        [TensorSpec("x", "BF16", (-1, 2))], [TensorSpec("y", "BF16", (-1, 2))], 4
    )
    with pytest.raises(ValueError, match="numpy has no BF16 dtype"):
        sig.example_feeds()
    with pytest.raises(InputError, match="datatype FP32 does not match the model's x: BF16"):
        sig.validate({"x": np.zeros((1, 2), np.float32)})
