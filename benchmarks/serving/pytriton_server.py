"""NVIDIA Triton as a contender, through PyTriton: run by the interpreter of PyTriton's own venv.

    <venv>/bin/python benchmarks/serving/pytriton_server.py MODEL.onnx NAME INPUT OUTPUT \\
        HTTP_PORT GRPC_PORT METRICS_PORT C,H,W

Triton's server binary (its C++ HTTP and gRPC front ends, dynamic batcher and Python backend) comes
with the ``nvidia-pytriton`` wheel; the model runs as 2 instances, each an onnxruntime session with
one intra-op thread, ``max_batch_size`` 64 and dynamic batching with a 1 ms delay — the settings of
our server and of the Ray Serve contender. Runs until SIGINT. Imports nothing of this
repository: its venv has ``numpy<2`` (PyTriton's requirement) and no fedserve.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

INSTANCES = 2
MAX_BATCH = 64


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def infer_function(sess: ort.InferenceSession, input_name: str, output_name: str):  # noqa: ANN201
    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {output_name: sess.run([output_name], {input_name: inputs[input_name]})[0]}

    return infer


def main() -> None:
    path, name, input_name, output_name, http, grpc, metrics, shape = sys.argv[1:9]
    dims = tuple(int(d) for d in shape.split(","))
    sessions = [session(path) for _ in range(INSTANCES)]
    classes = sessions[0].get_outputs()[0].shape[-1]
    config = TritonConfig(
        http_port=int(http), grpc_port=int(grpc), metrics_port=int(metrics), log_verbose=0
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=[infer_function(s, input_name, output_name) for s in sessions],
            inputs=[Tensor(name=input_name, dtype=np.float32, shape=dims)],
            outputs=[Tensor(name=output_name, dtype=np.float32, shape=(classes,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH,
                batcher=DynamicBatcher(max_queue_delay_microseconds=1000),
            ),
            strict=False,
        )
        try:
            triton.serve()
        except KeyboardInterrupt:  # SIGINT: the benchmark's stop
            pass


if __name__ == "__main__":
    main()
