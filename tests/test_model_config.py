"""config.pbtxt through Triton's own ModelConfig protobuf and text_format: every valid Triton config
in a corpus loads, invalid ones are refused naming the field, what we publish is what Triton's
parser reads, and a config a person edited keeps every field we do not own."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from repository_helpers import make_onnx, publish
from tritonclient.grpc import model_config_pb2 as mc

from serving.datatypes import ONNX_TO_V2
from serving.errors import RepositoryError
from serving.model_config import (
    complete_config,
    merge_published,
    new_config,
    render_config,
    tensor_specs,
    version_policy,
)
from serving.repository import ModelRepository
from serving.tensor_spec import TensorSpec


def parse_triton(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


# ---------------------------------------------------------------- the corpus

#: valid Triton configs, each with a feature the hand-written reader this replaced refused
VALID = {
    "two_parameters": """
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
        parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
        parameters { key: "execution_mode" value: { string_value: "0" } }
    """,
    "model_warmup": """
        name: "m" backend: "onnxruntime" max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
        model_warmup [ {
          name: "zeros" batch_size: 2
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
        } ]
    """,
    "reshape_to_scalar": """
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
    """,
    "optimization_accelerator": """
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 16
        input [ { name: "x" data_type: TYPE_FP16 dims: [ 3, 224, 224 ] } ]
        output [ { name: "y" data_type: TYPE_FP16 dims: [ 1000 ] } ]
        optimization { execution_accelerators {
          gpu_execution_accelerator : [ {
            name : "tensorrt"
            parameters { key: "precision_mode" value: "FP16" }
            parameters { key: "max_workspace_size_bytes" value: "1073741824" }
          } ]
        } }
    """,
    "ensemble_steps": """
        name: "pipeline" platform: "ensemble" max_batch_size: 8
        input [ { name: "raw" data_type: TYPE_UINT8 dims: [ -1 ] } ]
        output [ { name: "probs" data_type: TYPE_FP32 dims: [ 10 ] } ]
        ensemble_scheduling { step [
          { model_name: "preprocess" model_version: -1
            input_map { key: "in" value: "raw" } output_map { key: "out" value: "image" } },
          { model_name: "classifier" model_version: -1
            input_map { key: "x" value: "image" } output_map { key: "y" value: "probs" } }
        ] }
    """,
    "hand_written": """
        # a config as a person would write it for Triton
        name: "hand"  platform: 'onnxruntime_onnx'
        max_batch_size: 16
        input { name: "a" data_type: TYPE_FP32 dims: 3 dims: 224 dims: -1 }
        input: < name: "b", data_type: TYPE_STRING, dims: [ 1 ] >
        output [ { name: "y\\"q" data_type: TYPE_INT32 dims: [] } ]
        dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 250 }
        instance_group [ { count: 2, kind: KIND_CPU }, { kind: KIND_GPU gpus: [0, 1] } ]
        version_policy: { specific { versions: [1, 3] } }
    """,
}

#: invalid configs and the field protobuf's message names
INVALID = {
    "typo_field": ('name: "m" max_batch_sise: 8', "max_batch_sise"),
    "bad_enum": ('name: "m" instance_group [ { kind: KIND_GPUU } ]', "KIND_GPUU"),
    "bad_data_type": ('input [ { name: "x" data_type: TYPE_FLOAT32 } ]', "TYPE_FLOAT32"),
    "scalar_twice": ("max_batch_size: 1 max_batch_size: 2", "max_batch_size"),
    "string_for_int": ('max_batch_size: "eight"', "max_batch_size"),
    "unclosed": ('name: "m" input [ { name: "x" ', "1:"),
}


@pytest.mark.parametrize("key", sorted(VALID))
def test_every_valid_triton_config_loads(tmp_path: Path, key: str) -> None:
    text = VALID[key]
    name = parse_triton(text).name
    mdir = tmp_path / "repo" / name
    mdir.mkdir(parents=True)
    (mdir / "config.pbtxt").write_text(text)
    config = ModelRepository(tmp_path / "repo").read_config(name)
    assert config == parse_triton(text)
    assert parse_triton(render_config(config)) == config  # and what we write, Triton reads


@pytest.mark.parametrize("key", sorted(INVALID))
def test_invalid_config_is_refused_naming_the_field(tmp_path: Path, key: str) -> None:
    text, field = INVALID[key]
    with pytest.raises(text_format.ParseError):  # Triton's own parser refuses it too
        parse_triton(text)
    mdir = tmp_path / "repo" / "m"
    mdir.mkdir(parents=True)
    (mdir / "config.pbtxt").write_text(text)
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(RepositoryError, match="not a valid Triton ModelConfig") as info:
        repo.read_config("m")
    assert field in str(info.value) and str(mdir / "config.pbtxt") in str(info.value)
    # publishing into that model is refused before anything is written
    with pytest.raises(RepositoryError, match=field):
        publish(repo, tmp_path, name="m")
    assert repo.list_versions("m") == []
    assert (mdir / "config.pbtxt").read_text() == text


def test_config_naming_another_model_is_refused(tmp_path: Path) -> None:
    mdir = tmp_path / "repo" / "a"
    mdir.mkdir(parents=True)
    (mdir / "config.pbtxt").write_text('name: "b"')
    with pytest.raises(RepositoryError, match="names the model 'b'.*directory 'a'"):
        ModelRepository(tmp_path / "repo").read_config("a")


# ---------------------------------------------------------------- what we publish


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


def assert_config_matches_onnx(config: mc.ModelConfig, onnx_path: Path) -> None:
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
    assert version_policy(config) == {"latest": {"num_versions": 1}}
    assert repo.read_config("multi") == config
    inputs, outputs = tensor_specs(config, "multi")
    assert [s.shape for s in inputs] == [(-1, 3, 8, 8), (-1, 2)]
    assert [s.datatype for s in outputs] == ["FP32", "FP16"]


def test_no_batching_keeps_full_dims_and_all_policy() -> None:
    specs_in = [TensorSpec("input", "UINT8", [2, 4])]
    specs_out = [TensorSpec("out", "BOOL", [2])]
    config = parse_triton(
        render_config(
            new_config(
                "nb", specs_in, specs_out, max_batch_size=0, num_versions=None, instance_count=3
            )
        )
    )
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [2, 4]
    assert mc.DataType.Name(config.input[0].data_type) == "TYPE_UINT8"
    assert mc.DataType.Name(config.output[0].data_type) == "TYPE_BOOL"
    assert not config.HasField("dynamic_batching")
    assert version_policy(config) == {"all": {}}
    assert config.instance_group[0].count == 3
    assert tensor_specs(config, "nb")[0] == specs_in


def test_new_config_refuses_bad_arguments() -> None:
    x, y = [TensorSpec("x", "FP32", [-1, 3])], [TensorSpec("y", "FP32", [-1])]
    with pytest.raises(ValueError, match="dynamic batch dim"):
        new_config("m", [TensorSpec("x", "FP32", [4, 3])], y, max_batch_size=8)
    with pytest.raises(ValueError, match="KIND_GPUU"):
        new_config("m", x, y, max_batch_size=8, instance_kind="KIND_GPUU")
    with pytest.raises(ValueError, match="at least one input"):
        new_config("m", [], y, max_batch_size=8)


def test_version_policy_reads_every_choice() -> None:
    assert version_policy(mc.ModelConfig()) == {}
    assert version_policy(parse_triton(VALID["hand_written"])) == {"specific": {"versions": [1, 3]}}
    assert version_policy(parse_triton("version_policy { latest { num_versions: 2 } }")) == {
        "latest": {"num_versions": 2}
    }


# ---------------------------------------------------------------- a person's config stays theirs

EDITED = """# tuned by hand: keep my comments out of your way
name: "tiny"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
instance_group [ { count: 4 kind: KIND_CPU } ]
version_policy { all { } }
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }
model_warmup [ { name: "w" batch_size: 1
  inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } } ]
"""


def test_publish_keeps_a_user_edited_config(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    publish(repo, tmp_path)
    path = repo.config_path("tiny")
    path.write_text(EDITED)
    assert publish(repo, tmp_path, seed=1) == 2
    assert path.read_text() == EDITED  # agrees with the model: not rewritten, not even reformatted
    # a model whose interface changed: only the model-derived fields change
    src = tmp_path / "wide.onnx"
    make_onnx(src, 2, batch="batch")
    graph = onnx.load(str(src))
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5  # declare 5 classes
    onnx.save(graph, str(src))
    repo.publish("tiny", src, max_batch_size=16)
    config = repo.read_config("tiny")
    expected = parse_triton(EDITED)
    assert config.max_batch_size == 16 and list(config.output[0].dims) == [5]
    assert config.output[0].label_filename == "labels.txt"
    for field in ("instance_group", "version_policy", "parameters", "model_warmup", "input"):
        assert getattr(config, field) == getattr(expected, field), field


def test_merge_keeps_other_backends_and_drops_vanished_tensors() -> None:
    existing = parse_triton(
        'name: "m" backend: "onnxruntime" input [ { name: "old" data_type: TYPE_FP32 } ]'
    )
    fresh = new_config(
        "m", [TensorSpec("x", "FP32", [-1, 2])], [TensorSpec("y", "FP32", [-1])], max_batch_size=4
    )
    merged = merge_published(existing, fresh)
    assert merged.backend == "onnxruntime" and merged.platform == ""
    assert [t.name for t in merged.input] == ["x"] and list(merged.input[0].dims) == [2]
    assert not merged.HasField("dynamic_batching")  # not ours to add to an existing config


# ---------------------------------------------------------------- auto-complete


def test_complete_config_fills_what_the_config_omits() -> None:
    graph_in = [TensorSpec("x", "FP32", [-1, 4])]
    graph_out = [TensorSpec("y", "INT64", [-1])]
    done = complete_config(mc.ModelConfig(), "auto", graph_in, graph_out)
    assert done.name == "auto" and done.platform == "onnxruntime_onnx"
    assert done.max_batch_size == 4 and done.HasField("dynamic_batching")  # Triton's default
    assert tensor_specs(done, "auto") == (graph_in, graph_out)
    # a fixed batch dim: no batching, full shapes
    fixed = complete_config(mc.ModelConfig(), "f", [TensorSpec("x", "FP32", [1, 4])], graph_out)
    assert fixed.max_batch_size == 0 and list(fixed.input[0].dims) == [1, 4]
    # declared inputs stay, the missing outputs come from the graph
    declared = parse_triton('max_batch_size: 2 input { name: "x" data_type: TYPE_FP32 dims: 4 }')
    done = complete_config(declared, "d", graph_in, graph_out)
    assert [t.name for t in done.input] == ["x"] and [t.name for t in done.output] == ["y"]
    assert list(done.output[0].dims) == []
