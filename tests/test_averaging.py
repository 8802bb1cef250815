"""``strategy.ema_decay``: the server publishes a bias-corrected exponential moving average of its
versions, keeps training (and sending clients) the last version, and resumes it bit-identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_grid import received, small_model
from recorder import Recorder
from test_parameter_server import make

from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy.averaging import ParameterAverage
from server.strategy.config import StrategyConfig
from server.strategy.events import VersionEvent
from server.strategy.messaging import to_array_record
from task.config import ConfigError

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def hand_average(versions: list[dict[str, np.ndarray]], d: float) -> dict[str, np.ndarray]:
    """x̂_t = Σ_i (1-d) d^(t-i) x_i / (1 - d^t), in float64; non-float arrays: the last x_t."""
    t = len(versions)
    out = {}
    for key, last in versions[-1].items():
        if last.dtype.kind != "f":
            out[key] = last
            continue
        total = sum(
            (1 - d) * d ** (t - i) * x[key].astype(np.float64) for i, x in enumerate(versions, 1)
        )
        out[key] = total / (1 - d**t)
    return out


def test_average_matches_the_hand_computation() -> None:
    avg = ParameterAverage(0.6)
    model = small_model()
    assert avg.value(model) is model  # nothing folded in yet: the arrays themselves
    versions = []
    for seed in (1, 2, 3):
        x = small_model(seed)
        x["bn.num_batches_tracked"] = np.array(7 + seed, dtype=np.int64)
        versions.append(x)
        avg.update(x)
        got, want = avg.value(x), hand_average(versions, 0.6)
        assert got["w"].dtype == np.float32
        for key in x:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
    assert avg.value(versions[0])["w"] is not versions[0]["w"]
    np.testing.assert_allclose(
        avg.value(versions[0])["w"], hand_average(versions, 0.6)["w"], rtol=1e-6
    )
    assert int(got["bn.num_batches_tracked"]) == 10  # counters are not averaged
    restored = ParameterAverage(0.6)
    restored.load_state_dict(avg.state_dict())
    for key, value in avg.value(versions[-1]).items():
        np.testing.assert_array_equal(restored.value(versions[-1])[key], value)


def test_server_publishes_the_average_and_sends_clients_the_last_version() -> None:
    server, grid = make(4, ema_decay=0.5)
    raw: list[dict[str, np.ndarray]] = []
    published: list[dict[str, np.ndarray]] = []

    def on_version(event: VersionEvent) -> None:
        assert event.state is not None
        raw.append(event.state["arrays"])
        published.append(event.arrays)

    server.start(grid, to_array_record(small_model()), num_rounds=4, sink=Recorder(on_version))
    for t in range(1, 5):
        for key, value in hand_average(raw[:t], 0.5).items():
            np.testing.assert_allclose(published[t - 1][key], value, rtol=1e-6)
    assert not np.allclose(published[-1]["w"], raw[-1]["w"])  # the average is not the last
    for sent in grid.log:  # clients train from the server's own version, never the average
        arrays, version, _ = received(sent.message)
        expected = small_model() if version == 0 else raw[version - 1]
        for key, value in expected.items():
            np.testing.assert_array_equal(arrays[key], value)
    result = server.start(grid, to_array_record(small_model()), num_rounds=4)  # already done
    np.testing.assert_allclose(result.arrays["w"].numpy(), published[-1]["w"], rtol=1e-6)


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_resume_with_an_average_is_bit_identical(tmp_path: Path, background: bool) -> None:
    cfg = dict(optimizer="adam", server_lr=0.05, fraction_train=0.5, ema_decay=0.8)
    x0 = to_array_record(small_model())
    whole, grid = make(6, seed=7, **cfg)
    whole.start(grid, x0, num_rounds=5)

    first, grid1 = make(6, seed=7, publish_in_background=background, **cfg)
    path = tmp_path / "ckpt.pt"
    first.start(grid1, x0, num_rounds=2, sink=Recorder(lambda e: save_checkpoint(path, e.state)))
    state = load_checkpoint(path)
    assert state is not None and state["average"]["steps"] == 2
    second, grid2 = make(6, seed=123, node_offset=50_000, publish_in_background=background, **cfg)
    second.state.load_state_dict(state)
    second.start(grid2, to_array_record({"junk": np.zeros(1)}), num_rounds=5)
    for key, value in whole.state.published_arrays().items():
        np.testing.assert_array_equal(second.state.published_arrays()[key], value)
    for key, value in whole.state.global_arrays.items():
        np.testing.assert_array_equal(second.state.global_arrays[key], value)

    plain, _ = make(6, seed=7, **{**cfg, "ema_decay": 0.0})
    plain.state.load_state_dict(state)  # an averaged run's checkpoint resumes without averaging
    state.pop("average")
    with pytest.raises(ValueError, match="no parameter average but strategy.ema_decay=0.8"):
        make(6, seed=7, **cfg)[0].state.load_state_dict(state)


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (dict(ema_decay=1.0), r"strategy.ema_decay must be in \[0, 1\) \(0 = off\), got 1.0"),
        (dict(ema_decay=-0.1), r"strategy.ema_decay must be in \[0, 1\)"),
        (
            dict(implementation="flower_fedavg", ema_decay=0.9),
            "ema_decay needs implementation=parameter_server",
        ),
    ],
)
def test_bad_ema_decay_is_named(cfg: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        StrategyConfig(**cfg).validate()
