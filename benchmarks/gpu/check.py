"""What runs where on this machine, and how fast: ``python -m benchmarks.gpu.check``, in one go.

Prints

1. versions: Python, torch (+ its CUDA and cuDNN), onnx, onnxruntime, the onnxruntime providers
   available, the GPU torch sees, and whether a CUDA onnxruntime session actually gets the CUDA
   provider (onnxruntime-gpu lists it even where it then falls back to CPU);
2. inference, ORT CUDA EP vs torch on the same GPU, images/s at batch 1 and 64, for the FedAvg CNN
   (1x28x28) and ResNet-18 (3x32x32), same weights (exported with ``server.export``), with the
   max |ORT - torch| of the logits: torch with the batch already on the GPU, torch with the
   host-to-device copy (what a server pays), ORT from host numpy (what ``serving`` does), ORT with
   I/O binding (batch already on the GPU);
3. one round of client training (``task.training.train``: the conf/ default of 5 local epochs on
   one of 10 digits partitions for the CNN; 1 epoch of 360 synthetic 3x32x32 images for
   ResNet-18) on CUDA (after a warm-up step) and on CPU, seconds;
4. the ClientApp's ``train`` handler called with a Flower Message, ``device=cuda`` vs ``cpu``
   (seconds, the GPU's peak memory, the reply's delta compared);
5. the providers the serving pool's engines obtain (``serving.engine.Engine(...).providers``,
   ``serving.providers=auto``).

Without a GPU it says so, prints the versions and the serving providers (CPU), and exits 0.
``--seconds`` sets each timing loop's length (default 2); ``--cpu-stand-in`` runs every section
with the CPU standing in for the GPU (to exercise this script on a machine without one; the
numbers then compare nothing).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from serving.engine import Engine
from serving.providers import CPU, CUDA, cuda_usable

SHAPES = {"cnn": (1, 28, 28), "resnet18": (3, 32, 32)}
BATCHES = (1, 64)


def rate(fn: Callable[[], Any], images: int, seconds: float, sync: Callable[[], None]) -> float:
    """Images per second of back-to-back ``fn()`` calls over about ``seconds`` (after 3 warm-up
    calls); ``sync`` waits for queued device work, so the time covers all the work launched."""
    for _ in range(3):
        fn()
    sync()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    sync()
    return calls * images / (time.perf_counter() - started)


def versions() -> None:
    print("== versions")
    print(
        f"python        {platform.python_version()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    )
    print(
        f"torch         {torch.__version__} (CUDA build {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})"
    )
    print(f"onnx          {onnx.__version__}")
    print(f"onnxruntime   {ort.__version__} ({ort.get_device()})")
    print(f"ORT providers {', '.join(ort.get_available_providers())}")


def gpu_found() -> bool:
    torch_gpu = torch.cuda.is_available()
    ort_gpu = cuda_usable()
    if torch_gpu:
        props = torch.cuda.get_device_properties(0)
        print(
            f"GPU           {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
            f"{torch.cuda.device_count()} device(s))"
        )
    print(f"torch CUDA    {'yes' if torch_gpu else 'no'}")
    print(f"ORT CUDA EP   {'yes (a session obtains it)' if ort_gpu else 'no'}")
    return torch_gpu


def inference(seconds: float, workdir: Path, models: list[str], device_name: str = "cuda") -> None:
    from server.export import export_onnx
    from task.models import build_model

    print("\n== inference, images/s (same GPU, same weights)")
    header = (
        f"{'model':<9} {'batch':>5} | {'torch gpu':>10} {'torch h2d':>10} | "
        f"{'ORT CUDA':>10} {'ORT iobind':>10} | {'ORT EP':<9} {'max|diff|':>9}"
    )
    print(header)
    print("-" * len(header))
    device = torch.device(device_name)
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    providers = [CUDA, CPU] if gpu else [CPU]
    for name in models:
        shape = SHAPES[name]
        torch.manual_seed(0)
        model = build_model(name, shape, 10).eval()
        path = workdir / f"{name}.onnx"
        export_onnx(model, torch.randn(2, *shape), path, opset=18)
        model = model.to(device)
        session = ort.InferenceSession(str(path), providers=providers)
        ep = session.get_providers()[0].replace("ExecutionProvider", "")
        input_name = session.get_inputs()[0].name
        for batch in BATCHES:
            host = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
            on_gpu = torch.from_numpy(host).to(device)
            with torch.inference_mode():
                expected = model(on_gpu).float().cpu().numpy()
                torch_gpu = rate(lambda: model(on_gpu), batch, seconds, sync)  # noqa: B023
                torch_h2d = rate(
                    lambda: model(torch.from_numpy(host).to(device)).cpu(),  # noqa: B023
                    batch,
                    seconds,
                    sync,
                )
            got = session.run(None, {input_name: host})[0]
            ort_host = rate(
                lambda: session.run(None, {input_name: host}),  # noqa: B023
                batch,
                seconds,
                lambda: None,
            )
            ort_bound = _iobinding_rate(session, input_name, host, batch, seconds, device.type)
            diff = float(np.abs(got - expected).max())
            print(
                f"{name:<9} {batch:>5} | {torch_gpu:>10,.0f} {torch_h2d:>10,.0f} | "
                f"{ort_host:>10,.0f} {_fmt(ort_bound):>10} | {ep:<9} {diff:>9.1e}"
            )


def _iobinding_rate(
    session: Any, input_name: str, host: np.ndarray, batch: int, seconds: float, device: str
) -> float | None:
    try:
        value = ort.OrtValue.ortvalue_from_numpy(host, device, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, value)
        binding.bind_output(session.get_outputs()[0].name, device, 0)
        return rate(
            lambda: session.run_with_iobinding(binding), batch, seconds, binding.synchronize_outputs
        )
    except Exception as exc:  # noqa: BLE001 - reported as n/a
        print(f"  (I/O binding unavailable: {exc})")
        return None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def training(models: list[str], gpu_name: str = "cuda") -> None:
    from server.config_loader import compose_experiment
    from task.federated import client_data
    from task.models import build_model
    from task.training import make_loader, train

    print("\n== one round of client training (task.training.train), seconds")
    setups = {
        "cnn": (["model=cnn"], "digits partition 0 of 10, conf/ defaults (5 epochs, batch 16)"),
        "resnet18": (
            [
                "model=resnet18",
                "dataset=synthetic",
                "dataset.channels=3",
                "dataset.image_size=32",
                "dataset.num_samples=500",
                "train.local_epochs=1",
                "train.batch_size=32",
            ],
            "1 epoch of synthetic 3x32x32 images, batch 32",
        ),
    }
    print(f"{'model':<9} | {gpu_name:>7} | {'cpu':>7} | what")
    for name in models:
        overrides, what = setups[name]
        cfg = compose_experiment(overrides)
        data = client_data(cfg, 0, 1 if name == "resnet18" else 10)
        seconds = {}
        for label, device_name in (("gpu", gpu_name), ("cpu", "cpu")):
            device = torch.device(device_name)
            torch.manual_seed(0)
            model = build_model(name, data.input_shape, data.num_classes).to(device)
            loader = make_loader(
                data.train_x, data.train_y, cfg.train.batch_size, True, 0, device=device
            )
            if device.type == "cuda":  # CUDA context, cuDNN autotuning: not part of a round
                warm = make_loader(
                    data.train_x[:64], data.train_y[:64], 32, False, 0, device=device
                )
                train(
                    build_model(name, data.input_shape, data.num_classes), warm, cfg.train, device
                )
                torch.cuda.synchronize()
            started = time.perf_counter()
            train(model, loader, cfg.train, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[label] = time.perf_counter() - started
        print(
            f"{name:<9} | {seconds['gpu']:>7.2f} | {seconds['cpu']:>7.2f} | {what} "
            f"({len(data.train_y)} images, torch threads {torch.get_num_threads()} on CPU)"
        )


def client_app(gpu_name: str = "cuda") -> None:
    """The ClientApp's own ``train`` handler (client/app.py) called in-process with a Flower
    Message, as a SuperNode would: task config ``device=cuda`` vs ``device=cpu``, cnn on digits
    partition 0 of 10, conf/ defaults. Shows the client path (config -> get_device -> loader with
    pinned memory -> train -> delta reply) runs on the GPU: the GPU's peak memory must grow."""
    import json

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import train as client_train
    from server.config_loader import compose_experiment
    from task.federated import client_data
    from task.models import build_model

    print("\n== the ClientApp's train handler (client/app.py), one round, seconds")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = compose_experiment(["model=cnn"])
    data = client_data(cfg, 0, 10)
    torch.manual_seed(0)
    model = build_model("cnn", data.input_shape, data.num_classes)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 10},
        state=RecordDict(),
        run_config={},
    )
    deltas: dict[str, dict[str, np.ndarray]] = {}
    print(f"{'device':<7} | {'1st call':>8} | {'2nd call':>8} | {'GPU peak MiB':>12} | reply")
    for device in (gpu_name, "cpu"):
        task = cfg.task_dict() | {"device": device}  # what the server sends its clients
        seconds = []
        for _ in range(2):  # the first call pays data loading, CUDA context and cuDNN set-up
            config = ConfigRecord(
                {"task": json.dumps(task), "server-round": 1, "version": 0, "reply": "delta"}
            )
            content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
            msg = Message(content=content, dst_node_id=1, message_type="train")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            reply = client_train(msg, context)
            seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        if reply.has_error():
            raise RuntimeError(f"the ClientApp answered an error: {reply.error.reason}")
        arrays = reply.content["arrays"]
        deltas[device] = {k: v.numpy() for k, v in arrays.items()}
        finite = all(np.isfinite(v).all() for v in deltas[device].values())
        examples = reply.content["metrics"]["num-examples"]
        print(
            f"{device:<7} | {seconds[0]:>8.2f} | {seconds[1]:>8.2f} | {peak:>12.1f} | "
            f"{len(arrays)} arrays, finite={finite}, num-examples={examples}"
        )
    scale = max(float(np.abs(v).max()) for v in deltas["cpu"].values())
    diff = max(float(np.abs(deltas[gpu_name][k] - v).max()) for k, v in deltas["cpu"].items())
    print(f"max |delta({gpu_name}) - delta(cpu)| = {diff:.1e} (max |delta(cpu)| {scale:.1e})")


def serving_providers(workdir: Path) -> None:
    from server.export import export_onnx
    from task.models import build_model

    print("\n== serving pool engines (serving.providers=auto)")
    path = workdir / "serving-cnn.onnx"
    export_onnx(build_model("cnn", (1, 8, 8), 10), torch.randn(2, 1, 8, 8), path, opset=18)
    engine = Engine(path, max_batch_size=64, providers="auto", name="gpu-check")
    print(f"asked for     {engine.requested_providers}")
    print(f"obtained      {engine.providers}")
    on_gpu = engine.providers[:1] == [CUDA]
    print(f"serving runs on {'the GPU (CUDA EP)' if on_gpu else 'the CPU'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each timing loop")
    parser.add_argument(
        "--cpu-stand-in", action="store_true", help="run every section on the CPU (script test)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES), help="default: both"
    )
    args = parser.parse_args(argv)
    versions()
    found = gpu_found()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        if args.cpu_stand_in:
            print(
                "\n--cpu-stand-in: the CPU stands in for the GPU below; the numbers compare nothing"
            )
            inference(args.seconds, workdir, args.models, "cpu")
            training(args.models, "cpu")
            client_app("cpu")
            serving_providers(workdir)
            return 0
        if not found:
            print(
                "\nNO GPU FOUND: torch.cuda.is_available() is False, so there is nothing to "
                "compare on a GPU here; clients train and the serving pool runs on the CPU."
            )
            serving_providers(workdir)
            return 0
        inference(args.seconds, workdir, args.models)
        training(args.models)
        client_app()
        serving_providers(workdir)
    print(
        "\nnote: under `fedserve-train` (Flower simulation on Ray) a client actor sees the GPU "
        "only when given GPU resources (federation config client-resources-num-gpus > 0); with "
        "num-gpus 0 Ray hides the devices (CUDA_VISIBLE_DEVICES='')."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
