"""KServe v2 inference client for the demo: binary-tensor infer, readiness and accuracy."""

from __future__ import annotations

import http.client
import json

import numpy as np

MODEL_NAME = "fedserve"


class DemoFailed(RuntimeError):
    """A step of the pipeline failed (the message says which and where its log is)."""


class V2Client:
    """KServe v2 inference over one keep-alive HTTP connection, binary tensor extension."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()  # a dropped keep-alive connection: reconnect once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        return self._request("GET", "/v2/health/ready")[0] == 200

    def infer(
        self,
        x: np.ndarray,
        version: int | None = None,
        input_name: str = "input",
        output_name: str = "logits",
    ) -> tuple[int | None, np.ndarray | None]:
        """(answering version, logits), or (None, None) when the model/version is not served."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": input_name,
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
            }
        ).encode()
        path = f"/v2/models/{MODEL_NAME}" + (f"/versions/{version}" if version else "") + "/infer"
        status, headers, body = self._request(
            "POST",
            path,
            header + x.tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        )
        if status in (404, 503):
            return None, None
        if status != 200:
            raise DemoFailed(f"POST {path} answered {status}: {body[:300]!r}")
        length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
        n = int(length) if length is not None else len(body)
        doc = json.loads(body[:n])
        out = doc["outputs"][0]
        if "data" in out:
            logits = np.asarray(out["data"], dtype=np.float32)
        else:
            logits = np.frombuffer(body[n:], dtype=np.float32)
        return int(doc["model_version"]), logits.reshape(out["shape"])

    def accuracy(self, x: np.ndarray, y: np.ndarray, version: int, batch: int = 64) -> float | None:
        """Accuracy of ``version`` on (x, y), or None if it stopped being served meanwhile."""
        correct = 0
        for start in range(0, len(x), batch):
            answered, logits = self.infer(x[start : start + batch], version)
            if answered != version or logits is None:
                return None
            correct += int((logits.argmax(axis=1) == y[start : start + batch]).sum())
        return correct / len(y)
