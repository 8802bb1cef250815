"""The scheduler center (serving/scheduler.py) on tiny models: on-demand loads shared by concurrent
first requests, LRU eviction that never takes a version with requests in flight, pins, budget
violations refused, engines following demand without a failed request, hot swap within the
budget, a bounded wait for a load, memory measured at load, and a version that failed to load
retried once its directory changes (issue 14, serving item 6)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from serving_helpers import IN_FEATURES, classifier_weights, publish_classifier, running_server

from serving.api import create_app
from serving.config_schema import ConfigError
from serving.dataplane import DataPlane
from serving.engine import Engine
from serving.errors import BadRequest, InputError, NotFound, Unavailable
from serving.memory_probe import MemorySample
from serving.pool import EnginePool
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.scheduler import Scheduler
from serving.scheduler_budget import Budget
from serving.settings import BudgetConfig, ServingConfig
from serving.tensor_spec import TensorSpec
from serving.version_loader import load_version
from serving.watcher import RepositoryWatcher

X = np.ones((1, IN_FEATURES), np.float32)


def sized_pool(
    sizes: dict[str, int], delay_s: float = 0.0, gates: dict[str, threading.Event] | None = None
) -> type[EnginePool]:
    """Real pools whose memory is declared per model instead of measured: what these tests
    check is the scheduler's policy, and RSS growth in a test process is noise. A model named
    in ``gates`` is built only once its event is set."""

    class SizedPool(EnginePool):
        built: list[str] = []

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(delay_s)
            gate = (gates or {}).get(args[0])
            if gate is not None:
                gate.wait(30)
            super().__init__(*args, **kwargs)
            SizedPool.built.append(self.key)

        def memory_bytes(self, engines: int | None = None) -> int:
            return sizes.get(self.name, 1000)

        def working_bytes(self) -> int:
            return 0

    return SizedPool


class Served:
    def __init__(self, repo: ModelRepository, watcher: RepositoryWatcher, pools: type) -> None:
        self.repo = repo
        self.watcher = watcher
        self.scheduler = watcher.scheduler
        self.registry = watcher.registry
        self.pools = pools
        self.dataplane = DataPlane(self.registry, scheduler=self.scheduler)

    def use(self, name: str) -> np.ndarray:
        """One request to ``name`` through the scheduler (loading it if needed)."""
        return self.scheduler.request(name).result(30).infer({"x": X})["logits"]

    def state(self, name: str) -> tuple[str, str]:
        view = next(v for v in self.scheduler.versions() if v.model == name)
        return view.state, view.reason


@contextlib.contextmanager
def scheduled(
    tmp: Path,
    models: tuple[str, ...],
    *,
    sizes: dict[str, int] | None = None,
    memory: int = 10_000,
    engines: int = 8,
    load: str = "on_demand",
    pin: tuple[str, ...] = (),
    delay_s: float = 0.0,
    load_timeout_s: float = 30.0,
    versions: int | None = None,
    max_batch_size: int = 64,
    gates: dict[str, threading.Event] | None = None,
    pools: type[EnginePool] | None = None,
) -> Iterator[Served]:
    repo = ModelRepository(tmp / "repo")
    for name in models:
        publish_classifier(repo, tmp, name=name, seed=1)
    registry = ModelRegistry()
    settings = ServingConfig(
        providers="cpu",
        inline_max_ms=0,
        load=load,
        pin=list(pin),
        load_timeout_s=load_timeout_s,
        max_batch_size=max_batch_size,
        budget=BudgetConfig(rebalance_s=3600),  # engines move on loads/unloads and when told
    )
    pools = pools or sized_pool(sizes or {}, delay_s, gates)
    budget = Budget(
        engines=engines, engines_per_version=None, memory_bytes=memory, memory_kind="host"
    )
    scheduler = Scheduler(repo, registry, settings, pool_factory=pools, budget=budget)
    watcher = RepositoryWatcher(repo, registry, settings, scheduler=scheduler, versions=versions)
    watcher.start()
    try:
        yield Served(repo, watcher, pools)
    finally:
        watcher.stop()


def test_concurrent_first_requests_share_one_load(tmp_path: Path) -> None:
    with scheduled(tmp_path, ("a",), delay_s=0.3) as s:
        assert s.state("a") == ("UNAVAILABLE", "not loaded")  # on demand: nothing at start

        async def first_requests() -> list[EnginePool]:
            return await asyncio.gather(*(s.dataplane.acquire("a") for _ in range(8)))

        pools = asyncio.run(first_requests())
        assert len({id(p) for p in pools}) == 1 and s.pools.built == ["a:1"]
        counters = s.scheduler.counters()["a"]
        assert counters.loads == 1
        assert counters.cold_start_buckets[-1] == 1 and counters.cold_start_sum >= 0.3


def test_least_recently_used_idle_version_is_evicted_first(tmp_path: Path) -> None:
    sizes = {"a": 4000, "b": 4000, "c": 4000}  # the budget (10,000) holds two
    with scheduled(tmp_path, ("a", "b", "c"), sizes=sizes) as s:
        s.use("a")
        s.use("b")
        s.use("a")  # b is now the least recently used
        s.use("c")
        assert s.state("a")[0] == "READY" and s.state("c")[0] == "READY"
        assert s.state("b") == ("UNAVAILABLE", "evicted (least recently used) to load c:1")
        s.use("b")  # now a is the least recently used
        assert s.state("a")[0] == "UNAVAILABLE" and s.state("c")[0] == "READY"
        assert {n: c.evictions for n, c in s.scheduler.counters().items()} == {
            "a": 1,
            "b": 1,
            "c": 0,
        }
        assert s.scheduler.peak_memory_bytes <= 10_000
        assert s.repo.leased_versions("b") == {1} and s.repo.leased_versions("a") == set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Requests whose first value is 777 wait in the engine until the event is set."""
    opened = threading.Event()
    run = Engine.run

    def gated(self: Engine, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if next(iter(feeds.values())).flat[0] == 777:
            opened.wait(10)
        return run(self, feeds)

    monkeypatch.setattr(Engine, "run", gated)
    return opened


def test_a_version_with_requests_in_flight_is_never_evicted(
    tmp_path: Path, gate: threading.Event
) -> None:
    sizes = {"a": 4000, "b": 4000, "c": 4000}
    with scheduled(tmp_path, ("a", "b", "c"), sizes=sizes, load_timeout_s=0.5) as s:
        held = np.full((1, IN_FEATURES), 777, np.float32)
        in_flight = s.scheduler.request("a").result(10).infer
        with cf_thread(in_flight, {"x": held}) as slow:
            s.use("b")  # a is the least recently used, but has a request in flight
            s.use("c")
            assert s.state("a")[0] == "READY" and s.state("b")[0] == "UNAVAILABLE"
            with cf_thread(s.scheduler.request("c").result(10).infer, {"x": held}) as slow_c:
                # every resident version is busy: the load waits, then gives up with 503
                with pytest.raises(Unavailable) as info:
                    asyncio.run(s.dataplane.acquire("b"))
                # the request's wait and the load's wait for room share serving.load_timeout_s:
                # whichever ends first answers
                assert info.value.status == 503 and int(info.value.headers["Retry-After"]) >= 1
                assert (
                    "still loading after serving.load_timeout_s=0.5 s" in info.value.message
                    or "has requests in flight" in info.value.message
                )
                deadline = time.monotonic() + 10
                while s.state("b")[0] == "LOADING" and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert "every other version is pinned or has requests in flight" in s.state("b")[1]
                assert s.state("a")[0] == s.state("c")[0] == "READY"
                gate.set()
                slow_c.result(10)
            w, b = classifier_weights(1)
            np.testing.assert_allclose(slow.result(10)["logits"], held @ w + b, rtol=1e-5)
        s.use("b")  # both idle again: the least recently used goes
        assert s.state("b")[0] == "READY"


def test_a_version_whose_failed_request_is_still_being_isolated_is_not_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: while a failed run was isolated (its requests rerun one by one, the engine probed
    with its known-good input) the worker counted nothing running, so a load waiting for room
    found the version idle and evicted it with the request unanswered: the rule that a version
    with a request in flight is never evicted did not hold, and the request got 503 from the
    closing pool instead of its 400."""
    probing = threading.Event()
    probe_done = threading.Event()
    run, probe = Engine.run, Engine.probe

    def failing(self: Engine, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if next(iter(feeds.values())).flat[0] == 666:
            raise RuntimeError("the model cannot take 666")
        return run(self, feeds)

    def slow_probe(self: Engine) -> None:
        probing.set()
        probe_done.wait(10)
        probe(self)

    monkeypatch.setattr(Engine, "run", failing)
    monkeypatch.setattr(Engine, "probe", slow_probe)
    sizes = {"a": 6000, "b": 6000}  # the budget (10,000) holds one
    with scheduled(tmp_path, ("a", "b"), sizes=sizes) as s:
        bad = np.full((1, IN_FEATURES), 666, np.float32)
        with cf_thread(s.scheduler.request("a").result(10).infer, {"x": bad}) as failed:
            assert probing.wait(10)
            b = s.scheduler.request("b")  # room only if a goes
            time.sleep(0.3)  # several of the load's looks for room
            assert s.state("a")[0] == "READY" and not b.done()
            probe_done.set()  # the probe passes: the request was bad, a is idle now
            with pytest.raises(InputError, match="the model cannot take 666"):
                failed.result(10)
            assert b.result(10).key == "b:1"


def test_loads_waiting_for_room_do_not_hold_back_a_load_that_fits(
    tmp_path: Path, gate: threading.Event
) -> None:
    """Before: 4 loader threads, and a load waiting for room (for a busy version to go idle)
    held one, so four such loads (the benchmark's ResNet-18s waiting for each other) made every
    other cold start queue for a thread, 150-300 ms at p99, even one that fitted at once."""
    # the budget (20,000) holds a with f (a first load reserves ~1.25x its files), not with b-e
    sizes = {"a": 16000, "b": 6000, "c": 6000, "d": 6000, "e": 6000, "f": 500}
    names = tuple(sizes)
    with scheduled(tmp_path, names, sizes=sizes, memory=20_000, load_timeout_s=10) as s:
        for name in "bcde":
            s.use(name)  # measured: a reload reserves 6000 before it builds
        held = np.full((1, IN_FEATURES), 777, np.float32)
        with cf_thread(s.scheduler.request("a").result(10).infer, {"x": held}) as slow:
            waiting = [s.scheduler.request(name) for name in "bcde"]  # a is busy: no room
            time.sleep(0.2)
            assert not any(w.done() for w in waiting)
            assert s.scheduler.request("f").result(3).key == "f:1"  # fits beside a
            gate.set()
            slow.result(10)
            for w in waiting:
                with contextlib.suppress(Exception):  # they evict each other
                    w.result(20)


@contextlib.contextmanager
def cf_thread(fn: Any, *args: Any) -> Iterator[Any]:
    """Runs ``fn(*args)`` in a thread; yields a future-like handle with ``result(timeout)``."""
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(fn, *args)
        time.sleep(0.1)  # let it reach the engine
        yield fut


def test_a_version_loaded_again_while_its_unload_drains_ends_up_loaded(
    tmp_path: Path, gate: threading.Event
) -> None:
    with scheduled(tmp_path, ("a",)) as s:
        held = np.full((1, IN_FEATURES), 777, np.float32)
        with cf_thread(s.scheduler.request("a").result(10).infer, {"x": held}) as slow:
            with cf_thread(s.scheduler.unload_model, "a") as unloading:
                assert s.state("a")[0] == "UNLOADING"  # draining the request in flight
                with cf_thread(s.scheduler.load_model, "a") as loading:
                    gate.set()
                    unloading.result(10)
                    loading.result(10)
            slow.result(10)
        assert s.state("a") == ("READY", "")
        pool = s.registry.get("a")
        assert pool.ready and s.scheduler.request("a").result(1) is pool
        assert s.pools.built == ["a:1", "a:1"]


def test_pinned_versions_stay_resident(tmp_path: Path) -> None:
    sizes = {"a": 4000, "b": 4000, "c": 4000, "d": 4000}
    with scheduled(tmp_path, ("a", "b", "c", "d"), sizes=sizes, pin=("a",)) as s:
        assert s.state("a")[0] == "READY"  # loaded at start, though nothing asked for it
        for name in ("b", "c", "d", "b"):
            s.use(name)
            assert s.state("a")[0] == "READY"
        assert next(v for v in s.scheduler.versions() if v.model == "a").pinned
        assert s.scheduler.counters()["a"].evictions == 0


def test_a_budget_too_small_for_the_pins_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        with scheduled(tmp_path, ("a", "b", "c"), engines=2, pin=("a", "b", "c")):
            pass
    message = str(info.value)
    assert "serving.pin keeps 3 versions resident" in message
    assert "serving.budget.engines=2" in message
    with pytest.raises(ConfigError, match="serving.pin keeps 3 versions .*budget.engines=2"):
        ServingConfig(pin=["a", "b", "c"], budget=BudgetConfig(engines=2)).validate()

    repo = ModelRepository(tmp_path / "repo")
    sizes = {"a": 6000, "b": 6000}
    with pytest.raises(ConfigError) as info:
        with scheduled(tmp_path / "mem", ("a", "b"), sizes=sizes, pin=("a", "b")):
            pass
    assert "pinned version b:1 cannot be loaded" in str(info.value)
    assert "serving.budget.memory_bytes=10000 (12000 held)" in str(info.value)
    mem_repo = ModelRepository(tmp_path / "mem" / "repo")
    assert mem_repo.leased_versions("a") == set() and repo.leased_versions("a") == set()


def test_a_version_bigger_than_the_budget_is_refused_naming_both_sizes(tmp_path: Path) -> None:
    with scheduled(tmp_path, ("a", "big"), sizes={"a": 1000, "big": 20_000}) as s:
        s.use("a")
        with pytest.raises(BadRequest) as info:
            s.scheduler.load_model("big")
        assert info.value.status == 400
        assert "holds 20000 bytes (measured at load)" in info.value.message
        assert "more than serving.budget.memory_bytes=10000" in info.value.message
        assert s.state("a")[0] == "READY"  # what was loaded stays loaded
        with pytest.raises(NotFound, match="holds 20000 bytes"):  # remembered, not reloaded
            s.scheduler.request("big")
        assert s.pools.built.count("big:1") == 1
    with scheduled(tmp_path / "tiny", ("a",), memory=100) as s:  # the files alone are larger
        with pytest.raises(NotFound, match=r"needs at least \d+ bytes \(its files\), more than"):
            asyncio.run(s.dataplane.acquire("a"))
        assert s.pools.built == []


def test_a_request_waits_for_a_load_up_to_the_bound_then_503(tmp_path: Path) -> None:
    with scheduled(tmp_path, ("a",), delay_s=1.0, load_timeout_s=0.2) as s:
        with pytest.raises(Unavailable) as info:
            asyncio.run(s.dataplane.acquire("a"))
        assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
        assert "still loading after serving.load_timeout_s=0.2 s" in info.value.message
        deadline = time.monotonic() + 10
        while s.state("a")[0] != "READY" and time.monotonic() < deadline:
            time.sleep(0.02)  # the load went on without the request
        assert asyncio.run(s.dataplane.acquire("a")).version == 1
        assert s.pools.built == ["a:1"]


def test_engines_follow_demand_without_failing_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Engine.run

    def busy(self: Engine, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.003)  # a model that keeps an engine busy for 3 ms a request
        return run(self, feeds)

    monkeypatch.setattr(Engine, "run", busy)
    with scheduled(tmp_path, ("a", "b"), engines=4, load="eager", max_batch_size=1) as s:
        assert s.scheduler.rebalance() == {"a:1": 1, "b:1": 1}  # no demand: the rest stays free
        failures: list[str] = []

        def traffic(name: str, seconds: float) -> None:
            def client() -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    try:
                        s.registry.get(name).infer({"x": X})
                    except Exception as exc:  # noqa: BLE001 - counted
                        failures.append(repr(exc))

            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            for _ in range(8):  # the other version's smoothed demand halves each round
                time.sleep(seconds / 9)
                s.scheduler.rebalance()  # engines move while requests run
            for t in threads:
                t.join(30)

        traffic("a", 2.0)
        assert s.scheduler.rebalance() == {"a:1": 3, "b:1": 1}
        traffic("b", 2.0)
        assert s.scheduler.rebalance() == {"a:1": 1, "b:1": 3}
        assert failures == []
        pools = [s.registry.get("a"), s.registry.get("b")]
        assert all(p.engine_failures == 0 and not p.draining for p in pools)
        assert sum(len(p.workers) for p in pools) <= 4  # never more engines than the budget


def test_on_demand_loads_the_asked_versions_and_swaps_in_new_ones(tmp_path: Path) -> None:
    """Every version served (serving.versions): a poll loads nothing a request did not ask for,
    except a version published while its model is in use (the hot swap)."""
    with scheduled(tmp_path, ("clf",), versions=10) as s:
        for seed in (2, 3):
            publish_classifier(s.repo, tmp_path, name="clf", seed=seed)
        s.watcher.poll_once()
        assert s.pools.built == []
        s.scheduler.request("clf", 1).result(10)
        s.watcher.poll_once()
        assert s.pools.built == ["clf:1"]  # versions 2 and 3 were there before: not loaded
        publish_classifier(s.repo, tmp_path, name="clf", seed=4)
        s.watcher.poll_once()
        assert s.pools.built == ["clf:1", "clf:4"] and s.registry.models() == {"clf": [1, 4]}
        assert s.scheduler.request("clf").result(10).version == 4  # the default: the newest


def test_hot_swap_within_a_budget_that_holds_one_version(tmp_path: Path) -> None:
    """The newest version replaces its predecessor although both do not fit at once: the old
    one is retired (in-flight requests finish, new ones wait for the new version)."""
    with scheduled(tmp_path, ("clf",), sizes={"clf": 6000}, load="eager", engines=2) as s:
        app = create_app(s.dataplane)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]}
        seen: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def client(url: str) -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    r = http.post(f"{url}/v2/models/clf/infer", json=body)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        seen.append(r.json()["model_version"])

        with running_server(app) as url:
            threads = [threading.Thread(target=client, args=(url,)) for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 15
            while len(seen) < 10 and time.monotonic() < deadline:
                time.sleep(0.02)
            publish_classifier(s.repo, tmp_path, name="clf", seed=2)
            s.watcher.poll_once()
            deadline = time.monotonic() + 15
            while "2" not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
        assert "1" in seen and "2" in seen and seen[-1] == "2"
        assert s.scheduler.peak_memory_bytes <= 10_000
        assert s.registry.models() == {"clf": [2]}


def test_memory_is_measured_when_a_version_loads(tmp_path: Path) -> None:
    """A 4 MB weight: the measured size is at least the weights and shows in the statistics."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((1024, 1024)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "wide.onnx"))
    repo = ModelRepository(tmp_path / "repo")
    repo.publish(
        "wide",
        tmp_path / "wide.onnx",
        inputs=[TensorSpec("x", "FP32", [-1, 1024])],
        outputs=[TensorSpec("y", "FP32", [-1, 1024])],
        max_batch_size=8,
    )
    registry = ModelRegistry()
    settings = ServingConfig(providers="cpu", budget=BudgetConfig(engines=2))
    watcher = RepositoryWatcher(repo, registry, settings)
    watcher.start()
    try:
        watcher.scheduler.rebalance()  # engines settled: the arena's share is counted per engine
        pool = registry.get("wide")
        memory = pool.memory_bytes()
        assert weights.nbytes <= memory < 16 * weights.nbytes
        dataplane = DataPlane(registry, scheduler=watcher.scheduler)
        stats = asyncio.run(dataplane.model_statistics("wide"))
        usage = stats["model_stats"][0]["memory_usage"]
        assert usage == [{"type": "CPU", "id": 0, "byte_size": memory}]
        assert watcher.scheduler.memory_used() == memory
    finally:
        watcher.stop()


def test_a_version_that_failed_to_load_is_retried_when_its_directory_changes(
    tmp_path: Path,
) -> None:
    """Before: a version that failed verification once (say, caught mid-copy) was skipped
    forever, even after its directory became complete and valid."""
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    registry = ModelRegistry()
    watcher = RepositoryWatcher(repo, registry, ServingConfig(instances=1, providers="cpu"))
    watcher.poll_once()
    try:
        v2 = publish_classifier(repo, tmp_path, seed=2)
        model_file = repo.model_path("clf", v2)
        good = model_file.read_bytes()
        model_file.write_bytes(good[: len(good) // 2])  # half copied
        watcher.poll_once()
        assert registry.get("clf").version == 1 and ("clf", v2) in watcher.failed
        watcher.poll_once()  # unchanged: not tried again
        assert registry.get("clf").version == 1
        model_file.write_bytes(good)  # the copy completes
        watcher.poll_once()
        assert registry.get("clf").version == v2 and ("clf", v2) not in watcher.failed
        assert registry.models() == {"clf": [v2]}
    finally:
        watcher.stop()


def test_a_built_version_publishes_while_another_load_waits_for_room(
    tmp_path: Path, gate: threading.Event
) -> None:
    """Before: a load waiting for a busy version to go idle held the room lock for up to
    serving.load_timeout_s, so a version that had finished building could not re-check its room
    and publish: its requests (and every other load) waited out the whole timeout (30 s cold
    starts in the scheduler benchmark)."""
    c_built = threading.Event()
    with scheduled(tmp_path, ("a", "b", "c"), engines=2, gates={"c": c_built}) as s:
        held = np.full((1, IN_FEATURES), 777, np.float32)  # two engines: two versions resident
        with cf_thread(s.scheduler.request("a").result(10).infer, {"x": held}) as slow:
            c = s.scheduler.request("c")  # takes the second place, then builds once c_built is set
            deadline = time.monotonic() + 10
            while s.scheduler.memory_used() <= 1000 and time.monotonic() < deadline:
                time.sleep(0.01)
            b = s.scheduler.request("b")  # no place: a is busy, c is loading; b waits
            time.sleep(0.2)  # let b's load reach its wait
            c_built.set()
            assert c.result(5).key == "c:1"  # published while b waits (a is held for 10 s)
            gate.set()
            assert b.result(10).key == "b:1"  # in place of c (idle once published) or a
            slow.result(10)
        assert [v.state for v in s.scheduler.versions()].count("READY") == 2


def test_versions_are_built_one_at_a_time(tmp_path: Path) -> None:
    """Before: two loads built their sessions at once and each measured the other's heap growth
    too (a ResNet-18 measured 72.7 MB beside a CNN load, 48.3 MB alone), which inflated the
    budget's figures and refused a version as larger than the budget."""
    building: list[int] = []
    most = [0]
    lock = threading.Lock()

    class CountingPool(sized_pool({})):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with lock:
                building.append(1)
                most[0] = max(most[0], len(building))
            time.sleep(0.2)  # a build long enough for the other load to start its own
            try:
                super().__init__(*args, **kwargs)
            finally:
                with lock:
                    building.pop()

    with scheduled(tmp_path, ("a", "b"), pools=CountingPool) as s:
        loads = [s.scheduler.request(name) for name in ("a", "b")]
        assert sorted(f.result(10).key for f in loads) == ["a:1", "b:1"]
        assert most[0] == 1


def test_one_inflated_measurement_does_not_refuse_a_version_for_good(tmp_path: Path) -> None:
    """Before: a reload whose measurement was inflated past the budget (noise: the heap counts
    other threads' allocations) recorded the version as larger than the budget, and it was
    never loaded again although it had measured 4,000 bytes before."""
    measured = iter([4000, 20_000, 4000])

    class NoisyPool(sized_pool({})):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.size = next(measured)  # before the base class reports its memory
            super().__init__(*args, **kwargs)

        def memory_bytes(self, engines: int | None = None) -> int:
            return self.size

    with scheduled(tmp_path, ("a",), pools=NoisyPool) as s:
        s.use("a")
        s.scheduler.unload_model("a")
        with pytest.raises(
            BadRequest, match=r"over serving.budget.memory_bytes=10000 \(20000 held\)"
        ):
            s.scheduler.load_model("a")  # this load does not fit: 503 to its requests
        s.scheduler.load_model("a")  # but the version is not refused: the next load fits
        assert s.state("a") == ("READY", "")
        assert s.pools.built == ["a:1", "a:1", "a:1"]


def test_an_lru_victim_of_the_same_model_still_served_is_an_eviction(tmp_path: Path) -> None:
    """Before: unloading any version of the model being loaded was reported as "superseded by"
    the loaded version (even an older one superseding a newer) and not counted as an eviction,
    though the policy still served it."""
    with scheduled(tmp_path, ("clf",), sizes={"clf": 6000}, versions=10) as s:
        publish_classifier(s.repo, tmp_path, name="clf", seed=2)
        s.watcher.poll_once()
        s.scheduler.request("clf", 2).result(10)
        s.scheduler.request("clf", 1).result(10)
        s.scheduler.request("clf", 2).result(10)
        views = {v.version: v for v in s.scheduler.versions()}
        assert views[1].reason == "evicted (least recently used) to load clf:2"
        assert views[2].state == "READY"
        assert s.scheduler.counters()["clf"].evictions == 2


def test_a_reload_reserves_the_largest_of_its_measurements(tmp_path: Path) -> None:
    """Before: a reload reserved the version's smallest measurement, so one that measured a
    little more than that held more than its reservation until it re-checked its room, and the
    memory held went over the budget meanwhile (the scheduler benchmark's peak: 70.5 MB against a
    69.5 MB budget)."""
    measured = iter([4000, 4300, 4100])
    built = threading.Event()

    class NoisyPool(sized_pool({}, gates={"a": built})):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.size = next(measured)
            super().__init__(*args, **kwargs)

        def memory_bytes(self, engines: int | None = None) -> int:
            return self.size

    with scheduled(tmp_path, ("a",), pools=NoisyPool) as s:
        built.set()
        s.use("a")  # measures 4000
        s.scheduler.unload_model("a")
        s.scheduler.load_model("a")  # measures 4300
        s.scheduler.unload_model("a")
        built.clear()
        with cf_thread(s.scheduler.load_model, "a") as loading:  # reserves, waits to build
            deadline = time.monotonic() + 10
            while s.scheduler.memory_used() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.scheduler.memory_used() == 4300
            built.set()
            loading.result(10)
        assert s.scheduler.memory_used() == 4100


def test_a_load_waits_for_room_held_by_another_load_in_progress(tmp_path: Path) -> None:
    """Before: when the only version that could make room was still loading (its room reserved,
    not yet evictable), a load gave up at once with 503 instead of waiting for it to load and go
    idle (one failed request in each on-demand run of the scheduler benchmark: two ResNet-18
    versions, room for one)."""
    sizes = {"a": 6000, "b": 6000}  # the budget (10,000) holds one
    a_built = threading.Event()
    a_built.set()
    with scheduled(tmp_path, ("a", "b"), sizes=sizes, gates={"a": a_built}) as s:
        s.use("a")  # measured: a reload reserves 6000
        s.use("b")  # evicts a
        a_built.clear()
        a = s.scheduler.request("a")  # evicts b, reserves its room, waits to build
        deadline = time.monotonic() + 10
        while s.state("b")[0] == "READY" and time.monotonic() < deadline:
            time.sleep(0.01)
        b = s.scheduler.request("b")  # no room: only a, still loading, holds it
        time.sleep(0.2)  # let b's load look for room
        a_built.set()
        assert a.result(10).key == "a:1"
        assert b.result(10).key == "b:1"  # a went idle once loaded, and b evicted it
        assert s.state("a") == ("UNAVAILABLE", "evicted (least recently used) to load b:1")


def counting_builds(base: type[EnginePool], most_at_once: list[int]) -> type[EnginePool]:
    """``base`` whose builds take 0.3 s each and append how many run at once to
    ``most_at_once``."""
    building = 0
    counted = threading.Lock()

    class CountingPool(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            nonlocal building
            with counted:
                building += 1
                most_at_once.append(building)
            time.sleep(0.3)
            with counted:
                building -= 1
            super().__init__(*args, **kwargs)

    return CountingPool


def test_first_builds_run_alone_and_rebuilds_of_measured_versions_together(tmp_path: Path) -> None:
    """Before: every build held one lock, so a cold start of a small model measured before
    queued behind another model's whole build (the benchmark's cold-start p99: 145x a build)."""
    most_at_once: list[int] = []
    CountingPool = counting_builds(sized_pool({}), most_at_once)

    with scheduled(tmp_path, ("a", "b"), pools=CountingPool) as s:
        for future in [s.scheduler.request(name) for name in ("a", "b")]:
            future.result(30)
        assert max(most_at_once) == 1  # first builds: each measures its own heap growth
        for name in ("a", "b"):
            s.scheduler.unload_model(name)
        most_at_once.clear()
        with (
            cf_thread(s.scheduler.load_model, "a") as a,
            cf_thread(s.scheduler.load_model, "b") as b,
        ):
            a.result(30)
            b.result(30)
        assert max(most_at_once) == 2  # rebuilds of the same files keep their measurement
        assert s.state("a")[0] == "READY" and s.state("b")[0] == "READY"


def test_a_new_version_like_a_measured_one_builds_with_rebuilds_and_holds_its_measurement(
    tmp_path: Path,
) -> None:
    """Before: every version's first build ran alone (its heap growth is its memory), so the
    first cold start of each new version of a model (a round of training: the same
    architecture, files of the same sizes) held every other build back, up to a ResNet-18's
    200 ms. Now it runs together with rebuilds and holds the measurement of its sibling."""
    most_at_once: list[int] = []
    heap_growth = {"a:1": 4000, "a:2": 9000, "b:1": 5000}  # a:2 built next to b's rebuild

    class MeasuredPool(EnginePool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.session_memory = MemorySample(heap_growth[self.key], None)
            self.run_memory = MemorySample(0, None)

    CountingPool = counting_builds(MeasuredPool, most_at_once)

    with scheduled(tmp_path, ("a", "b"), pools=CountingPool, memory=100_000, versions=2) as s:
        s.use("a")
        s.use("b")
        for name in ("a", "b"):
            s.scheduler.unload_model(name)
        publish_classifier(s.repo, tmp_path, name="a", seed=2)  # the same architecture
        s.watcher.poll_once()
        most_at_once.clear()
        with cf_thread(s.scheduler.load_model, "b") as b:
            s.scheduler.load_model("a")  # a:2 (new) and a:1 (a rebuild)
            b.result(30)
        assert max(most_at_once) == 3  # a:2 built next to the rebuilds of a:1 and b
        views = {f"{v.model}:{v.version}": v for v in s.scheduler.versions()}
        assert views["a:2"].state == "READY"
        assert views["a:2"].memory_bytes == 4000  # a:1's measurement, not its inflated 9000


def test_verification_runs_outside_the_build_gate(tmp_path: Path) -> None:
    """Before: a version's first load verified its files (checksums, onnx checker: 120 ms of a
    ResNet-18's 250 ms) while holding the gate that keeps other builds out; only the build
    measures memory, so only the build holds it now."""
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, name="a", seed=1)
    held = threading.Event()
    seen: dict[str, bool] = {}

    @contextlib.contextmanager
    def gate() -> Iterator[None]:
        held.set()
        try:
            yield
        finally:
            held.clear()

    class Watched(ModelRepository):
        def verify(self, model: str, version: int) -> None:
            seen["verify"] = held.is_set()
            super().verify(model, version)

    class Built(EnginePool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen["build"] = held.is_set()
            super().__init__(*args, **kwargs)

    loaded = load_version(
        Watched(tmp_path / "repo"),
        "a",
        1,
        ServingConfig(providers="cpu"),
        pool_factory=Built,
        engines=1,
        gate=gate(),
    )
    try:
        assert seen == {"verify": False, "build": True}
        assert loaded.timing["gate_s"] is not None
    finally:
        loaded.pool.close()


def test_a_rebuild_measuring_more_than_before_holds_the_earlier_measurement(
    tmp_path: Path,
) -> None:
    """A rebuild runs next to other builds, so its heap growth counts theirs too: it keeps the
    version's smaller, earlier measurement instead of crowding other versions out."""
    heap_growth = iter([4000, 9000, 3500])

    class HeapPool(EnginePool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.session_memory = MemorySample(next(heap_growth), None)
            self.run_memory = MemorySample(0, None)

    with scheduled(tmp_path, ("a",), pools=HeapPool) as s:
        s.use("a")
        assert s.scheduler.memory_used() == 4000
        for expected in (4000, 3500):  # inflated: the earlier one; smaller: its own
            s.scheduler.unload_model("a")
            s.scheduler.load_model("a")
            assert s.scheduler.memory_used() == expected
