"""A mutation fuzzer for the KServe v2 HTTP API: JSON bodies, binary bodies and headers.

Each request starts from a valid one (JSON tensors, or Triton's binary extension) and gets one to
three mutations, drawn with a seeded RNG: a key deleted or given a value of another type (object,
list, string, huge or negative number, bool, null), a shape of absurd dims, data of the wrong
length or type, JSON nested thousands deep, the body truncated or bytes flipped, a wrong or junk
``Inference-Header-Content-Length``, ``Content-Length``, ``Content-Encoding`` or ``Content-Type``,
an unknown model/version/route. They go over a few keep-alive connections (``http.client``), and
the fuzzer counts every status, every 5xx (each must be 0: a malformed request is the client's
fault) and every dropped connection (a 4xx must keep the connection open).
"""

from __future__ import annotations

import collections
import http.client
import json
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

#: values a mutated field may become
JUNK_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**63), 1e308, float("inf"), "x", "", [], [1, "a"],
    {}, {"a": 1}, [[[]]], "FP32", [2**62, 0], [0, 2**63], 3.5,
]  # fmt: skip
DATATYPES = ["FP32", "FP64", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "FP16", "BF16", "fp32", ""]


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    dropped: int = 0

    @property
    def five_xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def _valid_json(rng: random.Random, width: int) -> dict[str, Any]:
    rows = rng.randint(1, 3)
    data = [round(rng.random(), 4) for _ in range(rows * width)]
    doc: dict[str, Any] = {
        "id": str(rng.randint(0, 10**6)),
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, width], "data": data}],
    }
    if rng.random() < 0.5:
        doc["outputs"] = [{"name": "logits", "parameters": {"binary_data": rng.random() < 0.5}}]
    return doc


def _mutate_doc(rng: random.Random, doc: dict[str, Any]) -> dict[str, Any]:
    inputs = doc.get("inputs")
    if not (isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) and inputs[0]):
        doc[rng.choice(["inputs", "outputs", "parameters", "id"])] = rng.choice(JUNK_VALUES)
        return doc
    item = inputs[0]
    choice = rng.randrange(14)
    if choice == 0:
        del item[rng.choice(list(item))]
    elif choice == 1:
        item[rng.choice(["name", "datatype", "shape", "data", "parameters"])] = rng.choice(
            JUNK_VALUES
        )
    elif choice == 2:
        item["shape"] = [
            rng.choice([0, 1, 2, -1, 2**31, 2**62, 2**63]) for _ in range(rng.randint(0, 5))
        ]
    elif choice == 3:
        item["datatype"] = rng.choice(DATATYPES)
    elif choice == 4:
        data = item.get("data") if isinstance(item.get("data"), list) else []
        item["data"] = data[: rng.randint(0, len(data))] + rng.choice(
            [[], ["a"], [None], [[1]], [1e39], [{}]]
        )
    elif choice == 5:
        doc[rng.choice(["inputs", "outputs", "parameters", "id"])] = rng.choice(JUNK_VALUES)
    elif choice == 6:
        doc["outputs"] = [
            rng.choice(
                [
                    {"name": "logits", "parameters": rng.choice(JUNK_VALUES)},
                    {"name": rng.choice(JUNK_VALUES)},
                    {"name": "nope"},
                    {"name": "logits", "parameters": {"classification": 2}},
                    "logits",
                ]
            )
        ]
    elif choice == 7:
        doc["inputs"].append(dict(item))  # the same input twice
    elif choice == 8:
        doc["inputs"].append({**item, "name": rng.choice(["y", "", "x" * 300])})
    elif choice == 9:
        item["parameters"] = {"binary_data_size": rng.choice(JUNK_VALUES)}
    elif choice == 10:
        doc["parameters"] = rng.choice(
            [{"binary_data_output": rng.choice(JUNK_VALUES)}, *JUNK_VALUES]
        )
    elif choice == 11:
        item["data"] = [item.get("data")]  # one level deeper
    elif choice == 12:
        doc["inputs"] = []
    else:
        item["data"] = [float("nan")] * 4
    return doc


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([500, 999, 1_001, 5_000, 100_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    return rng.choice([b'{"inputs": ' + inner + b"}", inner, b'{"inputs": [' + inner + b"]}"])


def make_request(rng: random.Random, width: int, model: str) -> tuple[str, bytes, dict[str, str]]:
    """One mutated request: (path, body, headers)."""
    path = f"/v2/models/{model}/infer"
    headers = {"Content-Type": "application/json"}
    kind = rng.random()
    if kind < 0.08:
        body = _deep(rng)
    elif kind < 0.45:
        doc = _valid_json(rng, width)
        for _ in range(rng.randint(1, 3)):
            doc = _mutate_doc(rng, doc)
        body = json.dumps(doc).encode()
    else:  # binary extension
        rows = rng.randint(1, 3)
        x = np.asarray([rng.random() for _ in range(rows * width)], np.float32)
        item: dict[str, Any] = {
            "name": "x",
            "datatype": "FP32",
            "shape": [rows, width],
            "parameters": {"binary_data_size": x.nbytes},
        }
        doc = {"inputs": [item], "parameters": {"binary_data_output": True}}
        if rng.random() < 0.6:
            doc = _mutate_doc(rng, doc)
        head = json.dumps(doc).encode()
        body = head + x.tobytes()
        headers["Inference-Header-Content-Length"] = str(len(head))
        headers["Content-Type"] = "application/octet-stream"
        if rng.random() < 0.5:
            headers["Inference-Header-Content-Length"] = str(
                rng.choice([0, -1, len(head) - 1, len(head) + 1, len(body) + 10, 2**63, "x", ""])
            )
    mutation = rng.random()
    if mutation < 0.1:
        body = body[: rng.randint(0, len(body))]
    elif mutation < 0.2 and body:
        flipped = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        body = bytes(flipped)
    elif mutation < 0.25:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "x"])
    elif mutation < 0.3:
        version = rng.choice(["9", "x", "-1", "99999999999999999999"])
        path = rng.choice(
            [
                f"/v2/models/{model}/versions/{version}/infer",
                "/v2/models/nope/infer",
                f"/v2/models/{model}/infer_stream",
                f"/v2/models/{model}",
                "/v2/repository/index",
            ]
        )
    elif mutation < 0.33:
        headers["Content-Type"] = rng.choice(["text/plain", "", "multipart/form-data"])
    return path, body, headers


def fuzz(base_url: str, requests: int, *, width: int = 4, model: str = "clf", seed: int = 0,
         connections: int = 4) -> FuzzReport:  # fmt: skip
    """Send ``requests`` mutated requests to ``base_url``; the report counts statuses, 5xx and
    dropped connections."""
    parts = urlsplit(base_url)
    rng = random.Random(seed)
    report = FuzzReport()
    conns = [
        http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        for _ in range(connections)
    ]
    try:
        for i in range(requests):
            path, body, headers = make_request(rng, width, model)
            conn = conns[i % connections]
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (http.client.HTTPException, OSError):
                report.dropped += 1
                conn.close()
                conns[i % connections] = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=30
                )
                continue
            report.requests += 1
            report.statuses[response.status] += 1
            if response.status >= 500:
                report.server_errors.append(
                    f"{response.status} {payload[:200]!r} for {body[:200]!r}"
                )
            if response.getheader("connection", "").lower() == "close":
                report.dropped += 1
    finally:
        for conn in conns:
            conn.close()
    return report
