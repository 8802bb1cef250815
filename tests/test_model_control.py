"""Triton's explicit model control and statistics extensions over HTTP, driven by tritonclient:
index, load, unload, statistics, their errors, and the scheduler's Prometheus metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from serving_helpers import IN_FEATURES, classifier_weights, publish_classifier, running_server
from tritonclient.utils import InferenceServerException

from serving.api import create_app
from serving.dataplane import DataPlane
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import BudgetConfig, ServingConfig
from serving.watcher import RepositoryWatcher

X = np.ones((2, IN_FEATURES), np.float32)


class Server:
    def __init__(self, url: str, repo: ModelRepository, watcher: RepositoryWatcher) -> None:
        self.url = url
        self.repo = repo
        self.watcher = watcher
        self.client = th.InferenceServerClient(url.removeprefix("http://"))

    def infer(self, name: str) -> th.InferResult:
        inp = th.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        return self.client.infer(name, [inp])

    def states(self) -> dict[str, tuple[str, str]]:
        return {
            f"{e['name']}:{e['version']}": (e["state"], e["reason"])
            for e in self.client.get_model_repository_index()
        }


@contextlib.contextmanager
def serve(tmp: Path, load: str, names: tuple[str, ...] = ("a", "b")) -> Iterator[Server]:
    repo = ModelRepository(tmp / "repo")
    for name in names:
        publish_classifier(repo, tmp, name=name, seed=1)
    registry = ModelRegistry()
    settings = ServingConfig(providers="cpu", load=load, budget=BudgetConfig(engines=4))
    # no background polls during a test: what the repository holds is read at start and by loads
    watcher = RepositoryWatcher(repo, registry, settings, poll_interval_s=60, full_poll_s=60)
    watcher.start()
    app = create_app(DataPlane(registry, ready=lambda: watcher.ready, scheduler=watcher.scheduler))
    try:
        with running_server(app) as url:
            yield Server(url, repo, watcher)
    finally:
        watcher.stop()


def corrupt(repo: ModelRepository, tmp: Path, name: str) -> int:
    version = publish_classifier(repo, tmp, name=name, seed=3)
    path = repo.model_path(name, version)
    path.write_bytes(path.read_bytes() + b"tampered")
    return version


def test_index_load_unload_and_statistics_through_tritonclient(tmp_path: Path) -> None:
    with serve(tmp_path, "on_demand") as s:
        corrupt(s.repo, tmp_path, "bad")
        c = s.client
        assert "statistics" in c.get_server_metadata()["extensions"]
        assert s.states() == {
            "a:1": ("UNAVAILABLE", "not loaded"),
            "b:1": ("UNAVAILABLE", "not loaded"),
        }

        c.load_model("a")
        assert s.states()["a:1"] == ("READY", "")
        w, b = classifier_weights(1)
        np.testing.assert_allclose(s.infer("a").as_numpy("logits"), X @ w + b, rtol=1e-5)

        stats = c.get_inference_statistics("a")["model_stats"]
        assert [(m["name"], m["version"]) for m in stats] == [("a", "1")]
        assert stats[0]["inference_count"] == 2 and stats[0]["execution_count"] == 1
        assert stats[0]["inference_stats"]["success"]["count"] == 1
        assert stats[0]["memory_usage"][0]["type"] == "CPU"
        assert stats[0]["memory_usage"][0]["byte_size"] > 0
        assert c.get_inference_statistics("a", "1")["model_stats"][0]["name"] == "a"
        assert [m["name"] for m in c.get_inference_statistics()["model_stats"]] == ["a"]

        c.unload_model("a")
        assert s.states()["a:1"] == ("UNAVAILABLE", "unloaded through the model control API")
        with pytest.raises(InferenceServerException, match="was unloaded") as info:
            s.infer("a")  # not loaded on demand once unloaded on purpose
        assert info.value.status() == "404"
        c.load_model("a")
        assert s.infer("a").get_response()["model_version"] == "1"

        s.infer("b")  # on demand
        assert s.states()["b:1"][0] == "READY"

        with pytest.raises(InferenceServerException, match="unknown model 'nope'") as info:
            c.load_model("nope")
        assert info.value.status() == "404"
        with pytest.raises(InferenceServerException, match="checksum mismatch") as info:
            c.load_model("bad")
        assert info.value.status() == "400"
        state, reason = s.states()["bad:1"]
        assert state == "UNAVAILABLE" and "checksum mismatch" in reason
        with pytest.raises(InferenceServerException, match="not supported") as info:
            c.load_model("a", config='{"max_batch_size": 8}')
        assert info.value.status() == "400"
        with pytest.raises(InferenceServerException, match="unknown model 'nope'") as info:
            c.get_inference_statistics("nope")
        assert info.value.status() == "404"

        ready = httpx.post(f"{s.url}/v2/repository/index", json={"ready": True}).json()
        assert {(e["name"], e["state"]) for e in ready} == {("a", "READY"), ("b", "READY")}
        r = httpx.post(f"{s.url}/v2/repository/models/a/load", content=b"[1, 2]")
        assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]

        metrics = httpx.get(f"{s.url}/metrics").text
        for line in (
            'fedserve_scheduler_engines{model="a",version="1"}',
            'fedserve_scheduler_memory_bytes{model="b",version="1"}',
            'fedserve_scheduler_loads_total{model="a"} 2.0',
            'fedserve_scheduler_evictions_total{model="a"} 0.0',
            'fedserve_scheduler_cold_start_seconds_count{model="b"} 1.0',
            "fedserve_scheduler_budget_engines 4.0",
            "fedserve_scheduler_memory_used_bytes",
        ):
            assert line in metrics, line


def test_a_failed_load_answers_400_and_keeps_what_was_loaded(tmp_path: Path) -> None:
    with serve(tmp_path, "eager", names=("clf",)) as s:
        assert s.states() == {"clf:1": ("READY", "")}
        v2 = corrupt(s.repo, tmp_path, "clf")  # the newest version is broken
        with pytest.raises(InferenceServerException, match="checksum mismatch") as info:
            s.client.load_model("clf")  # reads the repository again: finds version 2
        assert info.value.status() == "400"
        states = s.states()
        assert states["clf:1"] == ("READY", "")
        assert states[f"clf:{v2}"][0] == "UNAVAILABLE"
        assert s.infer("clf").get_response()["model_version"] == "1"


def test_an_oversized_control_body_names_its_own_limit(tmp_path: Path) -> None:
    """A control body over its fixed 64 KiB limit is a 413 that names that limit: it named
    serving.body_limit_bytes, whose raising cannot help (it bounds inference bodies only)."""
    with serve(tmp_path, "on_demand", names=("a",)) as s:
        body = b'{"parameters": {"x": "' + b"y" * 70_000 + b'"}}'
        url = f"{s.url}/v2/repository/models/a/load"
        for content in (body, iter([body[:40_000], body[40_000:]])):  # declared, then chunked
            r = httpx.post(url, content=content)
            assert r.status_code == 413
            message = r.json()["error"]
            assert "65536 bytes (the model control limit" in message
            assert "serving.body_limit_bytes" not in message
        assert httpx.post(url, json={"parameters": {}}).status_code == 200


def test_an_explicit_load_answers_for_a_bad_config(tmp_path: Path) -> None:
    """Triton's load re-reads the model, config included: a config.pbtxt edited into an invalid
    one, one naming another model or one for another platform made the load answer 200 (the
    loaded version kept serving, the broken file unmentioned). It is now a 400 naming the file
    and its fault; what was loaded keeps serving, and a fixed file loads."""
    with serve(tmp_path, "eager", names=("clf",)) as s:
        config = s.repo.root / "clf" / "config.pbtxt"
        good = config.read_text()
        for text, fault in (
            ("this is { not valid", "is not a valid Triton ModelConfig"),
            ('name: "other"', "names the model 'other'"),
            ('platform: "tensorflow_savedmodel"', "fedserve serves ONNX models only"),
        ):
            config.write_text(text)
            with pytest.raises(InferenceServerException, match=fault) as info:
                s.client.load_model("clf")
            assert info.value.status() == "400"
            assert s.infer("clf").get_response()["model_version"] == "1"
        config.write_text(good)
        s.client.load_model("clf")


def test_loading_a_model_removed_from_the_repository_is_404(tmp_path: Path) -> None:
    """The explicit load of a model whose directory was removed answered 200 (its version was
    still loaded) although the next poll unloads it: the client was told it is served."""
    with serve(tmp_path, "eager", names=("a", "b")) as s:
        (s.repo.root / "b").rename(tmp_path / "b-removed")
        with pytest.raises(InferenceServerException, match="unknown model 'b'") as info:
            s.client.load_model("b")
        assert info.value.status() == "404"
        assert "models in the repository: a" in info.value.message()
        s.client.load_model("a")


def test_a_version_is_named_by_ascii_digits_only(tmp_path: Path) -> None:
    """int() read the version 'versions/1_0' as 10, and ' 1', '+1' or '١' as 1: a request
    could be answered by another version than it named. Only ASCII digits name a version now,
    on the inference, metadata and statistics routes alike."""
    with serve(tmp_path, "on_demand", names=("a",)) as s:
        for v in range(2, 11):
            publish_classifier(s.repo, tmp_path, name="a", seed=v)
        s.client.load_model("a")  # reads the ten versions; the newest is served
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]}
        assert httpx.post(f"{s.url}/v2/models/a/versions/10/infer", json=body).status_code == 200
        for version in ("1_0", "%2B10", "%2010", "%D9%A1%D9%A0"):  # 1_0, +10, " 10", "١٠"
            for method, path in (
                ("POST", "infer"),
                ("GET", "ready"),
                ("GET", "stats"),
            ):
                r = httpx.request(
                    method, f"{s.url}/v2/models/a/versions/{version}/{path}", json=body
                )
                assert r.status_code == 404, (version, path, r.text)
                assert "unknown version" in r.json()["error"]
        assert httpx.get(f"{s.url}/v2/models/a/versions/010/stats").status_code == 200
