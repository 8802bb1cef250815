"""config.pbtxt: parsed with protobuf's text_format into Triton's own ModelConfig message (a real
parser of Triton's schema), compared with the ONNX graph, and read back by our light reader."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper

from serving.datatypes import ONNX_TO_V2
from serving.model_config import PbtxtError, parse_pbtxt, read_config, render_config
from serving.repository import ModelRepository
from serving.tensor_spec import TensorSpec

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse_triton(text: str):
    return text_format.Parse(text, mc.ModelConfig())


def make_multi_io(path: Path) -> None:
    """Two inputs (FP32 image, INT64 ids) and two outputs (FP32 logits, FP16 embedding)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Concat", ["pooled", "ids_f"], ["logits"], axis=1),
            helper.make_node("Cast", ["pooled"], ["embedding"], to=TensorProto.FLOAT16),
        ],
        "multi",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT16, ["batch", 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def assert_config_matches_onnx(config, onnx_path: Path) -> None:
    """Every input/output of the graph is in the config with the same name, dtype and dims."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    batching = config.max_batch_size > 0
    for kind, values, tensors in (
        ("input", list(graph.input), list(config.input)),
        ("output", list(graph.output), list(config.output)),
    ):
        assert [t.name for t in tensors] == [v.name for v in values], kind
        for tensor, value in zip(tensors, values, strict=True):
            elem = value.type.tensor_type.elem_type
            expected_type = "TYPE_" + {"BYTES": "STRING"}.get(ONNX_TO_V2[elem], ONNX_TO_V2[elem])
            assert mc.DataType.Name(tensor.data_type) == expected_type
            dims = [
                d.dim_value if d.HasField("dim_value") else -1
                for d in value.type.tensor_type.shape.dim
            ]
            if batching:
                assert dims[0] == -1, "batching needs a dynamic batch dim in the graph"
                dims = dims[1:]
            assert list(tensor.dims) == dims


def test_published_config_parses_as_triton_model_config(tmp_path: Path) -> None:
    src = tmp_path / "multi.onnx"
    make_multi_io(src)
    repo = ModelRepository(tmp_path / "repo")
    repo.publish("multi", src, max_batch_size=32, metadata={})
    text = (tmp_path / "repo" / "multi" / "config.pbtxt").read_text()
    config = parse_triton(text)
    assert config.name == "multi"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert_config_matches_onnx(config, src)
    assert [mc.DataType.Name(t.data_type) for t in config.input] == ["TYPE_FP32", "TYPE_INT64"]
    assert [list(t.dims) for t in config.input] == [[3, 8, 8], [2]]
    assert [mc.DataType.Name(t.data_type) for t in config.output] == ["TYPE_FP32", "TYPE_FP16"]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert len(config.instance_group) == 1
    assert config.instance_group[0].count == 1
    assert mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_AUTO"
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    # the light reader agrees with protobuf's parser
    ours = repo.read_config("multi")
    assert ours["name"] == "multi" and ours["max_batch_size"] == 32
    assert [(t["name"], t["data_type"], t["dims"]) for t in ours["input"]] == [
        (t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input
    ]
    assert [t["shape"] for t in ours["input"]] == [[-1, 3, 8, 8], [-1, 2]]
    assert [t["datatype"] for t in ours["output"]] == ["FP32", "FP16"]
    assert ours["dynamic_batching"] == {"max_queue_delay_microseconds": 100}
    assert ours["instance_group"] == [{"count": 1, "kind": "KIND_AUTO"}]
    assert ours["version_policy"] == {"latest": {"num_versions": 1}}


def test_no_batching_keeps_full_dims_and_all_policy() -> None:
    specs_in = [TensorSpec("input", "UINT8", [2, 4])]
    specs_out = [TensorSpec("out", "BOOL", [2])]
    text = render_config(
        "nb", specs_in, specs_out, max_batch_size=0, num_versions=None, instance_count=3
    )
    config = parse_triton(text)
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [2, 4]
    assert mc.DataType.Name(config.input[0].data_type) == "TYPE_UINT8"
    assert mc.DataType.Name(config.output[0].data_type) == "TYPE_BOOL"
    assert not config.HasField("dynamic_batching")
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert config.instance_group[0].count == 3
    ours = read_config(text)
    assert ours["input"][0]["shape"] == [2, 4] and ours["version_policy"] == {"all": {}}
    assert ours["dynamic_batching"] is None


def test_batching_needs_dynamic_batch_dim() -> None:
    with pytest.raises(ValueError, match="dynamic batch dim"):
        render_config(
            "m",
            [TensorSpec("x", "FP32", [4, 3])],
            [TensorSpec("y", "FP32", [-1])],
            max_batch_size=8,
        )


def test_reader_matches_protobuf_on_handwritten_config() -> None:
    text = """
    # a config as a person would write it for Triton
    name: "hand"  platform: 'onnxruntime_onnx'
    max_batch_size: 16
    input { name: "a" data_type: TYPE_FP32 dims: 3 dims: 224 dims: -1 }
    input: < name: "b", data_type: TYPE_STRING, dims: [ 1 ] >
    output [ { name: "y\\"q" data_type: TYPE_INT32 dims: [] } ]
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 250 }
    instance_group [ { count: 2, kind: KIND_CPU }, { kind: KIND_GPU gpus: [0, 1] } ]
    version_policy: { specific { versions: [1, 3] } }
    """
    proto = json_format.MessageToDict(
        parse_triton(text), preserving_proto_field_name=True, use_integers_for_enums=False
    )
    ours = parse_pbtxt(text)
    assert ours["name"] == proto["name"] and ours["platform"] == proto["platform"]
    assert ours["max_batch_size"] == proto["max_batch_size"]
    for field in ("input", "output"):
        assert [t["name"] for t in ours[field]] == [t["name"] for t in proto[field]]
        assert [t["data_type"] for t in ours[field]] == [t["data_type"] for t in proto[field]]
        assert [t.get("dims", []) for t in ours[field]] == [
            [int(d) for d in t.get("dims", [])] for t in proto[field]
        ]
    assert ours["output"][0]["name"] == 'y"q'
    assert ours["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert ours["dynamic_batching"]["max_queue_delay_microseconds"] == 250
    assert ours["instance_group"] == [
        {"count": 2, "kind": "KIND_CPU"},
        {"kind": "KIND_GPU", "gpus": [0, 1]},
    ]
    assert ours["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert read_config(text)["input"][1]["datatype"] == "BYTES"


@pytest.mark.parametrize(
    "text, where",
    [
        ('name: "x" input [ { name: "a" ', "end of text"),
        ('name: "x" }', "line 1"),
        ("a: @", "line 1"),
    ],
)
def test_reader_rejects_bad_text(text: str, where: str) -> None:
    with pytest.raises(PbtxtError, match=where):
        parse_pbtxt(text)
