"""The client's contract: reply ``local - received`` with num-examples, train-loss and version."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

import task.federated
from client.app import evaluate, query, train
from client.failures import MAX_REASON
from server.config import ExperimentConfig
from task.federated import client_data
from task.models import build_model
from task.params import get_arrays, set_arrays
from task.training import make_loader, make_train_loader, set_seed
from task.training import train as train_model

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CFG = {
    "model": {"name": "mlp"},
    "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
    "seed": 5,
}


def _context(partition_id: int = 1, num_partitions: int = 4) -> Context:
    return Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def _message(model: torch.nn.Module, kind: str, version: int = 3, reply: str = "delta") -> Message:
    config = ConfigRecord(
        {"task": json.dumps(CFG), "server-round": version + 1, "version": version, "reply": reply}
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content=content, dst_node_id=11, message_type=kind)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 10)


def test_train_replies_the_delta_and_its_metrics() -> None:
    model = _model()
    received = get_arrays(model)
    reply = train(_message(model, "train"), _context())

    delta = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    metrics = reply.content["metrics"]
    data = client_data(ExperimentConfig.from_dict(CFG), 1, 4)
    assert metrics["num-examples"] == len(data.train_y)
    assert metrics["version"] == 3
    assert metrics["partition-id"] == 1
    assert np.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    assert list(delta) == list(received)
    assert all(delta[k].shape == received[k].shape for k in delta)
    assert any(np.abs(d).max() > 0 for d in delta.values())

    # received + delta is exactly the model the client trained (same seeds, same data)
    local = _model()
    set_seed(5 * 1_000_003 + 3 * 1_009 + 1)
    loader = make_loader(data.train_x, data.train_y, 16, shuffle=True, seed=5 + 31 * 3 + 1)
    torch.set_num_threads(1)
    train_model(local, loader, ExperimentConfig.from_dict(CFG).train, torch.device("cpu"))
    for key, value in get_arrays(local).items():
        np.testing.assert_allclose(received[key] + delta[key], value, atol=1e-6)


def test_train_replies_full_weights_when_asked() -> None:
    model = _model()
    reply = train(_message(model, "train", reply="weights"), _context())
    delta_reply = train(_message(model, "train"), _context())
    received = get_arrays(model)
    for key, weights in reply.content["arrays"].items():
        delta = delta_reply.content["arrays"][key].numpy()
        np.testing.assert_allclose(weights.numpy(), received[key] + delta, atol=1e-6)


def test_evaluate_reports_validation_loss_and_accuracy() -> None:
    model = _model()
    reply = evaluate(_message(model, "evaluate"), _context(partition_id=0))
    metrics = reply.content["metrics"]
    data = client_data(ExperimentConfig.from_dict(CFG), 0, 4)
    assert metrics["num-examples"] == len(data.val_y) > 0
    assert 0.0 <= metrics["eval-acc"] <= 1.0
    assert metrics["eval-loss"] > 0


def test_query_reports_the_partition() -> None:
    reply = query(_message(_model(), "query"), _context(partition_id=2, num_partitions=4))
    assert reply.content["metrics"]["partition-id"] == 2
    assert reply.content["metrics"]["num-partitions"] == 4


def _query(task: dict | None) -> Message:
    config = ConfigRecord({"request": "partition-id"})
    if task is not None:
        config["task"] = json.dumps(task)
    return Message(content=RecordDict({"config": config}), dst_node_id=11, message_type="query")


@pytest.mark.parametrize(
    "task,loads,warms",
    [
        (None, False, False),  # a bare query: just the partition id
        (CFG, True, False),  # the task: load the partition before answering
        ({**CFG, "heterogeneity": {"device_factor": 10.0}}, True, True),  # + torch's warm-up
    ],
    ids=["bare", "task", "task-emulated"],
)
def test_query_with_the_task_gets_the_client_ready(
    monkeypatch: pytest.MonkeyPatch, task: dict | None, loads: bool, warms: bool
) -> None:
    import client.app

    loaded: list[int] = []
    warmed: list[str] = []
    monkeypatch.setattr(
        client.app,
        "client_data",
        lambda cfg, p, n: loaded.append(p) or client_data(cfg, p, n),
    )
    monkeypatch.setattr(client.app, "warm_up_once", lambda m, x, y: warmed.append(type(m).__name__))
    reply = query(_query(task), _context(partition_id=2, num_partitions=4))
    assert reply.content["metrics"]["partition-id"] == 2
    assert loaded == ([2] if loads else [])
    assert warmed == (["MLP"] if warms else [])


def test_missing_node_config_names_the_fix() -> None:
    context = _context()
    context.node_config.clear()
    reply = train(_message(_model(), "train"), context)
    assert reply.has_error()
    assert "--node-config 'partition-id=<i> num-partitions=<n>'" in reply.error.reason


def test_a_failure_is_one_error_reply_of_one_line_with_the_trace_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a crashing client sends the server is one line (not Ray's traceback three times);
    the full trace is logged once, at DEBUG."""
    cfg = {**CFG, "train": {**CFG["train"], "lr": 1e30}}  # the loss becomes inf: training raises
    message = _message(_model(), "train")
    message.content["config"]["task"] = json.dumps(cfg)
    with caplog.at_level(logging.DEBUG, logger="client"):
        reply = train(message, _context())
    assert reply.has_error() and reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("FloatingPointError: training loss became")
    assert "\n" not in reply.error.reason and len(reply.error.reason) <= MAX_REASON
    traces = [r for r in caplog.records if r.exc_info]
    assert len(traces) == 1 and traces[0].levelno == logging.DEBUG
    assert "train on node 11 failed" in traces[0].getMessage()


def test_an_expired_message_is_skipped_without_loading_or_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's simulation engine hands an actor a message even when it expired in its queue;
    the client answers at once instead of training for a server that stopped waiting."""
    import client.app

    monkeypatch.setattr(client.app, "client_data", lambda *a: pytest.fail("loaded data"))
    message = _message(_model(), "train")
    message.metadata.created_at = time.time() - 100
    message.metadata.ttl = 60
    reply = train(message, _context())
    assert reply.has_error()
    assert reply.error.reason.startswith("DeadlinePassed: the message expired 40.")


def test_training_stops_at_the_deadline() -> None:
    message = _message(_model(), "train")
    cfg = {**CFG, "train": {**CFG["train"], "local_epochs": 10_000}}  # hours of training
    message.content["config"]["task"] = json.dumps(cfg)
    message.metadata.ttl = 1.0
    started = time.perf_counter()
    reply = train(message, _context())
    assert reply.has_error() and reply.error.reason.startswith("DeadlinePassed: the deadline")
    assert time.perf_counter() - started < 30  # a bound against hangs, not a speed check


def test_resnet18_trains_on_a_partition_of_one_more_than_a_whole_batch() -> None:
    """BatchNorm cannot train on a batch of one sample: with len % batch_size == 1 the last
    batch is dropped (each epoch another sample sits out); other models use every sample."""
    digits_cfg = ExperimentConfig.from_dict(CFG)
    n = len(client_data(digits_cfg, 1, 4).train_y)
    batch_size = next(b for b in range(2, n) if n % b == 1)
    cfg = {
        **CFG,
        "model": {"name": "resnet18"},
        "train": {**CFG["train"], "batch_size": batch_size},
    }
    torch.manual_seed(0)
    model = build_model("resnet18", (1, 8, 8), 10)
    message = _message(model, "train")
    message.content["config"]["task"] = json.dumps(cfg)
    reply = train(message, _context())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] == n
    x, y = torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.int64)
    assert len(make_train_loader(model, x, y, batch_size, seed=0)) == n // batch_size
    assert len(make_train_loader(_model(), x, y, batch_size, seed=0)) == n // batch_size + 1


def test_set_arrays_after_delta_roundtrip() -> None:
    model = _model()
    arrays = get_arrays(model)
    set_arrays(model, {k: v + 1 for k, v in arrays.items()})
    assert all(np.allclose(get_arrays(model)[k], arrays[k] + 1) for k in arrays)


def test_an_actor_serving_many_partitions_splits_the_dataset_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A simulation actor serves partitions in turn, more than the per-partition cache keeps:
    each one used to split the whole dataset again."""
    splits: list[int] = []
    original = task.federated.partition_indices

    def counted(labels: np.ndarray, num_partitions: int, *args: object) -> list[np.ndarray]:
        splits.append(num_partitions)
        return original(labels, num_partitions, *args)

    monkeypatch.setattr(task.federated, "partition_indices", counted)
    cfg = ExperimentConfig.from_dict({**CFG, "seed": 17})  # a key no other test cached
    sizes = [len(client_data(cfg, p, 12).train_y) for p in [*range(12), *range(12)]]
    assert splits == [12] and sum(sizes[:12]) == sum(sizes[12:]) > 0
    assert sizes[:12] == sizes[12:]
