"""Helpers for the serving tests: tiny ONNX models built with ``onnx.helper`` (no torch),
publishing through :class:`serving.repository.ModelRepository`, and a real uvicorn server on a free
127.0.0.1 port that always stops."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.processes import free_port

IN_FEATURES = 4
CLASSES = 3


def classifier_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((IN_FEATURES, CLASSES)).astype(np.float32)
    b = (rng.standard_normal(CLASSES) + 10.0 * seed).astype(np.float32)
    return w, b


def make_classifier(path: Path, seed: int = 0) -> Path:
    """``logits = x @ W + b`` with ``x: FP32[batch, 4]``; ``b`` is shifted by ``10 * seed`` so
    that the version that answered is visible in the output."""
    w, b = classifier_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "B"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_cnn(
    path: Path, seed: int = 0, channels: int = 1, size: int = 28, classes: int = 10
) -> Path:
    """The FedAvg paper CNN (conv5x5-32, pool, conv5x5-64, pool, fc-512, fc-classes), random
    weights."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    flat = 64 * (size // 4) * (size // 4)
    inits = [
        init("c1w", 32, channels, 5, 5),
        init("c1b", 32),
        init("c2w", 64, 32, 5, 5),
        init("c2b", 64),
        init("f1w", flat, 512),
        init("f1b", 512),
        init("f2w", 512, classes),
        init("f2b", classes),
    ]
    pads = [2, 2, 2, 2]
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"], pads=pads),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["fl"], axis=1),
        helper.make_node("MatMul", ["fl", "f1w"], ["m1"]),
        helper.make_node("Add", ["m1", "f1b"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h"]),
        helper.make_node("MatMul", ["h", "f2w"], ["m2"]),
        helper.make_node("Add", ["m2", "f2b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def publish_classifier(
    repo: Any, tmp: Path, name: str = "clf", seed: int = 0, max_batch_size: int = 64
) -> int:
    """Builds the classifier for ``seed`` and publishes it through ``repo`` (a ModelRepository)."""
    from serving.tensor_spec import TensorSpec

    onnx_path = make_classifier(tmp / f"{name}-{seed}-{time.monotonic_ns()}.onnx", seed)
    return repo.publish(
        name,
        onnx_path,
        inputs=[TensorSpec("x", "FP32", [-1, IN_FEATURES])],
        outputs=[TensorSpec("logits", "FP32", [-1, CLASSES])],
        metadata={"round": seed, "metrics": {"accuracy": 0.5 + seed / 100}, "seed": seed},
        max_batch_size=max_batch_size,
    )


@contextlib.contextmanager
def running_server(app: Any, timeout: float = 15.0) -> Iterator[str]:
    """Runs ``app`` under uvicorn in a thread on a free 127.0.0.1 port; yields the base URL
    (``http://127.0.0.1:PORT``) and always stops the server."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)


@contextlib.contextmanager
def running_frontends(
    dataplane: Any,
    app: Any,
    *,
    token: str | None = None,
    serving: Any = None,
    timeout: float = 15.0,
) -> Iterator[tuple[str, str]]:
    """Runs ``fedserve-serve``'s HTTP and gRPC front ends (:func:`serving.servers.run_servers`) in a
    thread's event loop on free 127.0.0.1 ports; yields ``(http_url, grpc_address)`` and always
    stops them."""
    import asyncio
    import dataclasses

    from serving.servers import run_servers
    from serving.settings import ServeConfig, ServingConfig

    settings = dataclasses.replace(serving or ServingConfig(), grpc_port=free_port())
    conf = ServeConfig(port=free_port(), token=token, log_level="warning", serving=settings)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    listening = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(
                run_servers(conf, app, dataplane, stop=stop, banner=lambda _: listening.set())
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failure.append(exc)
        finally:
            listening.set()
            loop.close()

    thread = threading.Thread(target=run, name="frontends", daemon=True)
    thread.start()
    if not listening.wait(timeout) or failure:
        raise RuntimeError(f"front ends did not start: {failure}")
    try:
        yield f"http://127.0.0.1:{conf.port}", f"127.0.0.1:{settings.grpc_port}"
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)


@contextlib.contextmanager
def linked(dataplane: Any) -> Iterator[Any]:
    """``dataplane`` served by a :class:`~serving.dataplane_link.LinkServer` on a thread's event
    loop (as the engine process serves it to its front-end processes); yields a
    :class:`~serving.dataplane_link.RemoteDataPlane` on that link, which connects in the event
    loop of its first call."""
    import asyncio
    import shutil
    import tempfile

    from serving.dataplane_link import LinkServer, RemoteDataPlane

    directory = tempfile.mkdtemp(prefix="link-")
    server = LinkServer(dataplane, f"{directory}/link", config=None)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="link", daemon=True)
    thread.start()
    if not started.wait(15):
        raise RuntimeError("the link server did not start")
    try:
        yield RemoteDataPlane(server.path)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        loop.close()
        shutil.rmtree(directory, ignore_errors=True)
