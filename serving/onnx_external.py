"""ONNX external data: find and rewrite where a graph's external tensors say their bytes live.

Walks every tensor of a graph (initializers, sparse initializers, node attributes and nested
subgraphs). Needs onnx only.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The ``location`` values of every external tensor of ``model`` (empty: all inline)."""
    locations = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def relocate_external(model: onnx.ModelProto, location: str) -> None:
    """Point every external tensor of ``model`` at ``location`` (in place; offsets unchanged)."""
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
