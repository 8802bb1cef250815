"""Triton's ``config.pbtxt`` for an ONNX model: written from tensor specs, read back as dicts.

The file is Triton's ``ModelConfig`` protobuf message in protobuf text format
(https://github.com/triton-inference-server/common/blob/main/protobuf/model_config.proto).
:func:`render_config` writes the subset fedserve needs (``name``, ``platform``, ``max_batch_size``,
``input``/``output``, ``dynamic_batching``, ``instance_group``, ``version_policy``);
:func:`parse_pbtxt` is a small reader of protobuf text format that returns plain dicts, so a
serving node can read the file back without Triton's generated protobuf classes.

Shapes: a :class:`~serving.tensor_spec.TensorSpec` shape includes the batch dimension (``-1`` is
dynamic). Triton's ``dims`` exclude it whenever ``max_batch_size > 0``; with ``max_batch_size: 0``
the dims are the full shape. Data types are written as Triton's ``TYPE_*`` names
(:mod:`serving.datatypes`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from serving.datatypes import triton_to_v2, v2_to_triton
from serving.tensor_spec import TensorSpec

# ---------------------------------------------------------------- writer

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def triton_dims(shape: Sequence[int], max_batch_size: int) -> list[int]:
    """Triton ``dims`` for a full shape (batch included): drop the batch dim when batching."""
    shape = [int(d) for d in shape]
    if max_batch_size > 0:
        if not shape:
            raise ValueError("a tensor of a batching model (max_batch_size > 0) needs a batch dim")
        if shape[0] != -1:
            raise ValueError(
                f"max_batch_size={max_batch_size} needs a dynamic batch dim (-1) first, "
                f"got shape {shape}; export with a dynamic batch axis or set max_batch_size=0"
            )
        return shape[1:]
    return shape


def render_config(
    name: str,
    inputs: Iterable[TensorSpec],
    outputs: Iterable[TensorSpec],
    *,
    max_batch_size: int,
    platform: str = "onnxruntime_onnx",
    max_queue_delay_microseconds: int = 100,
    dynamic_batching: bool = True,
    instance_count: int = 1,
    instance_kind: str = "KIND_AUTO",
    num_versions: int | None = 1,
) -> str:
    """``config.pbtxt`` text for one model.

    ``inputs``/``outputs`` shapes include the batch dim. ``num_versions=None`` serves all
    versions (``version_policy { all {} }``), otherwise the newest ``num_versions``. Dynamic
    batching is only written when batching.
    """
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    if num_versions is not None and num_versions < 1:
        raise ValueError(f"num_versions must be >= 1 or None (all), got {num_versions}")
    if not _IDENT.match(instance_kind):
        raise ValueError(f"instance_kind must be a KIND_* enum name, got {instance_kind!r}")
    lines = [
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"max_batch_size: {int(max_batch_size)}",
    ]
    for field, specs in (("input", inputs), ("output", outputs)):
        specs = list(specs)
        if not specs:
            raise ValueError(f"a model needs at least one {field}")
        lines.append(f"{field} [")
        for i, spec in enumerate(specs):
            dims = triton_dims(spec.shape, max_batch_size)
            lines += [
                "  {",
                f"    name: {_quote(spec.name)}",
                f"    data_type: {v2_to_triton(spec.datatype)}",
                f"    dims: [ {', '.join(str(d) for d in dims)} ]",
                "  }" + ("," if i < len(specs) - 1 else ""),
            ]
        lines.append("]")
    if dynamic_batching and max_batch_size > 0:
        lines += [
            "dynamic_batching {",
            f"  max_queue_delay_microseconds: {int(max_queue_delay_microseconds)}",
            "}",
        ]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {int(instance_count)}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    if num_versions is None:
        lines += ["version_policy {", "  all {}", "}"]
    else:
        lines += ["version_policy {", f"  latest {{ num_versions: {int(num_versions)} }}", "}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reader

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
    | (?P<ident>-?[A-Za-z_][A-Za-z0-9_.]*)
    | (?P<punct>[{}\[\]<>:,;])
    """,
    re.VERBOSE,
)

#: Fields of Triton's ModelConfig (and nested messages) that are repeated; the reader always
#: returns a list for these, even when the file holds one entry.
REPEATED_FIELDS = frozenset(
    {"input", "output", "dims", "instance_group", "gpus", "versions", "preferred_batch_size"}
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


class PbtxtError(ValueError):
    """The text is not valid protobuf text format (for the subset this reader handles)."""


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            line = text.count("\n", 0, pos) + 1
            raise PbtxtError(f"unexpected character {text[pos]!r} at line {line}")
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append((kind, match.group(), text.count("\n", 0, pos) + 1))
        pos = match.end()
    return tokens


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _scalar(kind: str, token: str) -> Any:
    if kind == "string":
        return _unquote(token)
    if kind == "number":
        raw = token.rstrip("fF") if not token.lower().startswith(("0x", "-0x", "+0x")) else token
        if re.fullmatch(r"[-+]?0[xX][0-9a-fA-F]+", raw):
            return int(raw, 16)
        if re.fullmatch(r"[-+]?\d+", raw):
            return int(raw)
        return float(raw)
    if token in ("true", "True", "t"):
        return True
    if token in ("false", "False", "f"):
        return False
    if token.lstrip("-").lower() in ("inf", "infinity", "nan"):
        return float(token.replace("infinity", "inf"))
    return token  # enum value name, e.g. TYPE_FP32


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> tuple[str, str, int]:
        tok = self._peek()
        if tok is None:
            raise PbtxtError(f"unexpected end of text, expected {expected or 'a token'}")
        if expected is not None and tok[1] != expected:
            raise PbtxtError(f"expected {expected!r} at line {tok[2]}, got {tok[1]!r}")
        self.i += 1
        return tok

    def message(self, closing: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            tok = self._peek()
            if tok is None:
                if closing is not None:
                    raise PbtxtError(f"unexpected end of text, expected {closing!r}")
                return out
            if closing is not None and tok[1] == closing:
                self.i += 1
                return out
            kind, name, line = self._take()
            if kind != "ident":
                raise PbtxtError(f"expected a field name at line {line}, got {name!r}")
            has_colon = self._peek() is not None and self._peek()[1] == ":"  # type: ignore[index]
            if has_colon:
                self._take(":")
            values = self._values(name)
            if name in REPEATED_FIELDS:
                out.setdefault(name, []).extend(values)
            elif name in out:
                raise PbtxtError(f"field {name!r} given twice (line {line})")
            elif len(values) != 1:
                raise PbtxtError(f"field {name!r} is not repeated but has a list (line {line})")
            else:
                out[name] = values[0]
            nxt = self._peek()
            if nxt is not None and nxt[1] in (",", ";"):
                self.i += 1

    def _values(self, name: str) -> list[Any]:
        tok = self._peek()
        if tok is None:
            raise PbtxtError(f"missing value for field {name!r}")
        if tok[1] == "[":
            self.i += 1
            values: list[Any] = []
            if self._peek() is not None and self._peek()[1] == "]":  # type: ignore[index]
                self.i += 1
                return values
            while True:
                values.append(self._value(name))
                sep = self._take()
                if sep[1] == "]":
                    return values
                if sep[1] != ",":
                    raise PbtxtError(f"expected ',' or ']' in list {name!r} at line {sep[2]}")
        return [self._value(name)]

    def _value(self, name: str) -> Any:
        kind, token, line = self._take()
        if token in ("{", "<"):
            return self.message("}" if token == "{" else ">")
        if kind in ("string", "number", "ident"):
            value = _scalar(kind, token)
            while kind == "string" and self._peek() is not None and self._peek()[0] == "string":  # type: ignore[index]
                value += _unquote(self._take()[1])  # adjacent strings concatenate
            return value
        raise PbtxtError(f"bad value {token!r} for field {name!r} at line {line}")


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Parse protobuf text format into nested dicts (messages), lists (repeated), scalars.

    Enum values stay as their names (``"TYPE_FP32"``). Fields named in :data:`REPEATED_FIELDS`
    are always lists. Raises :class:`PbtxtError` naming the line of a syntax error.
    """
    return _Parser(text).message(None)


def read_config(text: str) -> dict[str, Any]:
    """Parse a ``config.pbtxt`` and fill the defaults Triton would use for the fields we write.

    Returns ``name``, ``platform``, ``max_batch_size``, ``input``/``output`` (each with ``name``,
    ``data_type``, ``dims``, plus ``datatype`` (v2) and ``shape`` (batch dim included as -1 when
    batching)), ``dynamic_batching`` (dict or None), ``instance_group``, ``version_policy``.
    """
    raw = parse_pbtxt(text)
    config: dict[str, Any] = dict(raw)
    mbs = int(raw.get("max_batch_size", 0))
    config["max_batch_size"] = mbs
    for field in ("input", "output"):
        tensors = []
        for entry in raw.get(field, []):
            entry = dict(entry)
            dims = [int(d) for d in entry.get("dims", [])]
            entry["dims"] = dims
            entry.setdefault("data_type", "TYPE_INVALID")
            entry["datatype"] = (
                triton_to_v2(entry["data_type"]) if entry["data_type"] != "TYPE_INVALID" else None
            )
            entry["shape"] = ([-1] + dims) if mbs > 0 else dims
            tensors.append(entry)
        config[field] = tensors
    config["dynamic_batching"] = raw.get("dynamic_batching")
    groups = []
    for group in raw.get("instance_group", []):
        group = dict(group)
        group.setdefault("count", 1)
        group.setdefault("kind", "KIND_AUTO")
        groups.append(group)
    config["instance_group"] = groups
    config["version_policy"] = raw.get("version_policy") or {"latest": {"num_versions": 1}}
    return config
