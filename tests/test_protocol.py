"""The v2 codec: JSON and binary tensors in and out; errors that name the input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.errors import BadRequest
from serving.inference import InferRequest
from serving.protocol import decode_request, encode_response
from serving.tensor_spec import TensorSpec

SPECS = {"x": TensorSpec("x", "FP32", (-1, 4)), "ids": TensorSpec("ids", "INT64", (-1, 2))}


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def test_json_request_flat_and_nested_data() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for data in (x.ravel().tolist(), x.tolist()):
        body = json.dumps(
            {
                "id": "r1",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": data}],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        req = decode_request(body, None, SPECS)
        assert req.id == "r1"
        np.testing.assert_array_equal(req.inputs["x"], x)
        assert req.inputs["x"].dtype == np.float32
        assert req.outputs == [("logits", True)]


def test_binary_request_two_inputs_in_order() -> None:
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    ids = np.arange(6, dtype=np.int64).reshape(3, 2)
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [3, 4],
             "parameters": {"binary_data_size": x.nbytes}},
            {"name": "ids", "datatype": "INT64", "shape": [3, 2],
             "parameters": {"binary_data_size": ids.nbytes}},
        ],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    body, hl = _binary_body(header, x.tobytes(), ids.tobytes())
    req = decode_request(body, str(hl), SPECS)
    np.testing.assert_array_equal(req.inputs["x"], x)
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    assert req.outputs is None and req.binary_output is True


@pytest.mark.parametrize(
    ("body", "header_length", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3]}]}',
            None,
            "input 'x': 'data' has 3 elements but shape [2, 4] needs 8 (model expects x: FP32",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1, 4], "data": [1,2,3,4]}]}',
            None,
            "input 'x': unknown datatype 'FP99'",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a","b","c","d"]}]}',  # noqa: E501
            None,
            "input 'x': 'data' is not a list of FP32",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4], "data": [1,2,3,4]}]}',
            None,
            "input 'x': 'shape' must be a list of non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}',
            None,
            "input 'x': neither 'data' nor parameters.binary_data_size",
        ),
    ],
)
def test_bad_json_requests(body: bytes, header_length: int | None, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(body, header_length, SPECS)
    assert needle in str(info.value)


def test_binary_errors_name_the_input() -> None:
    x = np.zeros((2, 4), np.float32)
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 4],
             "parameters": {"binary_data_size": x.nbytes}}
        ]
    }  # fmt: skip
    body, hl = _binary_body(header, x.tobytes()[:10])  # missing binary part
    with pytest.raises(BadRequest, match=r"input 'x': binary data missing, need 32 bytes"):
        decode_request(body, hl, SPECS)
    header["inputs"][0]["parameters"]["binary_data_size"] = 16  # disagrees with the shape
    body, hl = _binary_body(header, x.tobytes()[:16])
    with pytest.raises(BadRequest, match=r"input 'x': binary_data_size is 16 but FP32 shape"):
        decode_request(body, hl, SPECS)
    body, hl = _binary_body(
        {**header, "inputs": [{**header["inputs"][0], "parameters": {"binary_data_size": 32}}]},
        x.tobytes() + b"junk",
    )
    with pytest.raises(BadRequest, match="after the last binary input"):
        decode_request(body, hl, SPECS)
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length is 999"):
        decode_request(b"{}", 999, SPECS)


def test_encode_json_and_binary_outputs() -> None:
    out = {"logits": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.arange(2)}
    req = InferRequest(inputs={}, id="7", outputs=None, binary_output=False)
    body, hl = encode_response("m", "3", out, ["logits", "ids"], req)
    assert hl is None
    doc = json.loads(body)
    assert doc["model_name"] == "m" and doc["model_version"] == "3" and doc["id"] == "7"
    assert doc["outputs"][0] == {
        "name": "logits", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]
    }  # fmt: skip
    assert doc["outputs"][1]["datatype"] == "INT64"

    req = InferRequest(inputs={}, outputs=[("logits", True)])
    body, hl = encode_response("m", "3", out, ["logits", "ids"], req)
    head = json.loads(body[:hl])
    assert [o["name"] for o in head["outputs"]] == ["logits"]
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    got = np.frombuffer(body[hl : hl + size], np.float32).reshape(2, 3)
    np.testing.assert_array_equal(got, out["logits"])


def _one_input(**overrides: object) -> dict:
    item = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    return {"inputs": [{**item, **overrides}]}


MALFORMED = {
    "output parameters not an object": (
        {**_one_input(), "outputs": [{"name": "logits", "parameters": [1, 2]}]},
        "output 'logits': 'parameters' must be a JSON object, got [1, 2]",
    ),
    "input parameters not an object": (
        _one_input(parameters="yes"),
        "input 'x': 'parameters' must be a JSON object, got 'yes'",
    ),
    "a zero dim beside one numpy cannot hold": (
        _one_input(shape=[0, 2**63], data=[]),
        "input 'x': shape [0, 9223372036854775808] is larger than any tensor",
    ),
    "a dim of 2**62": (
        _one_input(shape=[2**62, 0], data=[]),
        "is larger than any tensor this server holds",
    ),
    "65 dims": (_one_input(shape=[1] * 65, data=[1]), "at most 64 dims"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_bad_requests(case: str) -> None:
    doc, needle = MALFORMED[case]
    with pytest.raises(BadRequest) as info:
        decode_request(json.dumps(doc).encode(), None, SPECS)
    assert needle in info.value.message


def test_json_nested_deeper_than_the_parser_goes_is_a_bad_request() -> None:
    for depth in (1_000, 100_000):
        body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(BadRequest, match="not valid JSON|'inputs'|'name'"):
            decode_request(body, None, SPECS)
    deep_item = {"inputs": [json.loads("[" * 900 + "]" * 900)]}  # under the limit, odd item
    with pytest.raises(BadRequest, match="each input needs a 'name'"):
        decode_request(json.dumps(deep_item).encode(), None, SPECS)
