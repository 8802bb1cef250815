"""fedserve ClientApp.

``train``: load the received global parameters, train ``train.local_epochs`` on this node's
partition, reply ``local - received`` (the delta a parameter server is pushed; full weights when the
server asks ``reply="weights"``, as Flower's FedAvg does) with ``num-examples``, ``train-loss`` and
the global ``version`` the client started from. ``evaluate``: loss and accuracy on the partition's
validation split. ``query``: the node's ``partition-id``, so the server can sample by partition id
(the same cohort whatever node ids the runtime assigned); when the query carries the ``task`` the
client first loads its partition (and, with emulated device times, runs torch's one-off warm-up),
so the federation is ready to train once discovery ends.

Everything the client needs about the task travels in the message's ``config["task"]`` (JSON of the
server's composed config), so the server's conf/ is the one source of truth.

Every handler answers; a failure is an error reply with a one-line reason (:mod:`client.failures`).
Work on a message past its deadline is given up (:mod:`client.deadline`): a simulated client must
not hold a shared actor for a reply the server no longer waits for. ``faults.*`` injects client
faults for reliability tests (:mod:`client.faults`).
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.deadline import Deadline
from client.failures import error_reply_on_failure
from client.faults import InjectedCrash, corrupt_update, fault_of
from client.heterogeneity import (
    WorkTimer,
    emulated,
    pad_to_device_time,
    slow_partitions,
    warm_up_once,
)
from task.config import TaskConfig
from task.federated import ClientData, client_data
from task.models import build_model
from task.training import evaluate as evaluate_model
from task.training import get_device, make_loader, make_train_loader, set_seed
from task.training import train as train_model

log = logging.getLogger(__name__)

app = ClientApp()


def _node_partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}; start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from err


def _task_config(msg: Message) -> TaskConfig:
    raw = msg.content["config"].get("task")
    if not isinstance(raw, str):
        raise ValueError("message config lacks 'task' (the JSON task config the server sends)")
    return TaskConfig.from_dict(json.loads(raw))


def _prepare(msg: Message, context: Context) -> tuple[TaskConfig, ClientData, torch.nn.Module]:
    cfg = _task_config(msg)
    partition_id, num_partitions = _node_partition(context)
    data = client_data(cfg, partition_id, num_partitions)
    device = get_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one simulated client per core; also keeps results reproducible
    model = build_model(cfg.model.name, data.input_shape, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, data, model.to(device)


@app.query()
@error_reply_on_failure
def query(msg: Message, context: Context) -> Message:
    Deadline.of(msg).check("the partition query")
    partition_id, num_partitions = _node_partition(context)
    if "task" in msg.content["config"]:  # get ready to train before answering: data, warm-up
        cfg = _task_config(msg)
        data = client_data(cfg, partition_id, num_partitions)
        if emulated(cfg.heterogeneity):
            model = build_model(cfg.model.name, data.input_shape, data.num_classes)
            model = model.to(get_device(cfg.device))
            warm_up_once(model, data.train_x[:2], data.train_y[:2])
    metrics = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
@error_reply_on_failure
def train(msg: Message, context: Context) -> Message:
    deadline = Deadline.of(msg)
    deadline.check("training started")  # queued behind others until it expired: skip it
    cfg, data, model = _prepare(msg, context)
    partition_id, num_partitions = _node_partition(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    version = int(config.get("version", server_round - 1))
    fault = fault_of(cfg.faults, partition_id, num_partitions, cfg.seed, version)
    if fault == "crash":
        raise InjectedCrash(f"injected fault: partition {partition_id} crashes (faults.*)")
    if fault == "straggle":  # its device takes straggle_factor x the deadline: never in time
        deadline.sleep(cfg.faults.straggle_factor * msg.metadata.ttl)
    if emulated(cfg.heterogeneity):  # torch's one-off set-up is no device's work
        warm_up_once(model, torch.as_tensor(data.train_x[:2]), torch.as_tensor(data.train_y[:2]))
    timer = WorkTimer()  # the device's work: local training from here
    device = next(model.parameters()).device
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}

    set_seed(cfg.seed * 1_000_003 + version * 1_009 + partition_id)
    loader = make_train_loader(
        model,
        data.train_x,
        data.train_y,
        cfg.train.batch_size,
        seed=cfg.seed + 31 * version + partition_id,
        num_workers=cfg.train.num_workers,
        device=device,
    )
    global_params = [p.detach().clone() for p in model.parameters()]
    loss = train_model(
        model, loader, cfg.train, device, global_params=global_params, deadline=deadline.at
    )

    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    delta = {k: local[k] - received[k].cpu() for k in local}
    if fault is not None:
        delta = corrupt_update(fault, delta, cfg.faults.scale_factor)
        local = {
            k: received[k].cpu() + d if d.shape == received[k].shape else d
            for k, d in delta.items()
        }
    weights = config.get("reply", "delta") == "weights"
    arrays = ArrayRecord(local if weights else delta)

    slow = partition_id in slow_partitions(cfg.heterogeneity, num_partitions, cfg.seed)
    pad_to_device_time(cfg.heterogeneity, slow, timer, device.type, sleep=deadline.sleep)
    metrics = MetricRecord(
        {
            "num-examples": len(data.train_y),
            "train-loss": float(loss),
            "version": version,
            "partition-id": partition_id,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
@error_reply_on_failure
def evaluate(msg: Message, context: Context) -> Message:
    Deadline.of(msg).check("the evaluation started")
    cfg, data, model = _prepare(msg, context)
    if len(data.val_y) == 0:  # partition.val_fraction=0: nothing to evaluate on
        metrics = MetricRecord({"num-examples": 0, "eval-loss": 0.0, "eval-acc": 0.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
    device = next(model.parameters()).device
    loader = make_loader(data.val_x, data.val_y, 256, shuffle=False, seed=cfg.seed, device=device)
    loss, accuracy = evaluate_model(model, loader, device)
    metrics = MetricRecord(
        {"num-examples": len(data.val_y), "eval-loss": float(loss), "eval-acc": float(accuracy)}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
