"""The demo's questions to ``fedserve-serve`` over :mod:`serving.v2_client`: which version
answers, and how accurate a version is."""

from __future__ import annotations

import numpy as np

from serving.v2_client import V2Client, V2Error

MODEL_NAME = "fedserve"
INPUT, OUTPUT = "input", "logits"


class DemoFailed(RuntimeError):
    """A step of the pipeline failed (the message says which and where its log is)."""


def ask(
    client: V2Client, x: np.ndarray, version: int | None = None
) -> tuple[int | None, np.ndarray | None]:
    """(answering version, logits) for the images ``x``, or (None, None) while the model or that
    version is not served (404, 503)."""
    try:
        result = client.infer(
            MODEL_NAME, {INPUT: np.asarray(x, dtype=np.float32)}, [OUTPUT], version=version
        )
    except V2Error as err:
        if err.status in (404, 503):
            return None, None
        raise DemoFailed(str(err)) from None
    return int(result.model_version), result.outputs[OUTPUT]


def accuracy(
    client: V2Client, x: np.ndarray, y: np.ndarray, version: int, batch: int = 64
) -> float | None:
    """Accuracy of ``version`` on (x, y), or None if it stopped being served meanwhile."""
    correct = 0
    for start in range(0, len(x), batch):
        answered, logits = ask(client, x[start : start + batch], version)
        if answered != version or logits is None:
            return None
        correct += int((logits.argmax(axis=1) == y[start : start + batch]).sum())
    return correct / len(y)
