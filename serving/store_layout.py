"""The model repository's layout on a model store, and a listing read as that layout.

The keys are the local layout's (so Triton can load the repository from the store as it is)::

    <model>/config.pbtxt
    <model>/<version>/model.onnx, model.onnx.data, metadata.json
    <model>/<version>/.fedserve-manifest.json    written last: the version's commit point
    <model>/.fedserve_state.json                 highest version ever published
    <model>/.tmp-<pid>-<id>/...                  a version being uploaded
    .lease-<host>-<pid>-<id>.json                a reader's leases (serving.leases)

An object store has no atomic rename of a directory, so a version is *committed* by one small
object written after all of its files: the manifest, which lists every file with its size and
sha256. Readers ignore a version without it (half uploaded, or being deleted: deletion removes
the manifest first). The version's files are uploaded under a ``.tmp-`` prefix first and only
then moved to the version's prefix, so an interrupted upload leaves no files under a version
number that Triton would list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from serving.errors import RepositoryError
from serving.layout import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    TMP_RE,
    VERSION_RE,
    is_model_dir_name,
)
from serving.leases import is_lease_file
from serving.store import Entry

MANIFEST_FILE = ".fedserve-manifest.json"
#: a file name within the version's directory: no separator, no control character (fullmatch)
_SAFE_FILE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class RemoteModel:
    """One model directory of a listing."""

    config: Entry | None = None
    state: Entry | None = None
    #: committed versions: version -> {file: Entry} (manifest included)
    versions: dict[int, dict[str, Entry]] = field(default_factory=dict)
    #: version prefixes without a manifest: version -> {file: Entry}
    uncommitted: dict[int, dict[str, Entry]] = field(default_factory=dict)
    #: upload prefixes (.tmp-*) -> {file: Entry}
    staging: dict[str, dict[str, Entry]] = field(default_factory=dict)

    def manifest(self, version: int) -> Entry:
        return self.versions[version][MANIFEST_FILE]


@dataclass
class RemoteListing:
    models: dict[str, RemoteModel] = field(default_factory=dict)
    leases: list[str] = field(default_factory=list)


def parse_listing(entries: dict[str, Entry]) -> RemoteListing:
    """Read a flat listing (key -> Entry) as models, committed versions and the rest; keys
    that are not part of the layout are ignored."""
    listing = RemoteListing()
    grouped: dict[str, dict[str, dict[str, Entry]]] = {}
    for key, entry in entries.items():
        parts = key.split("/")
        if len(parts) == 1:
            if is_lease_file(parts[0]):
                listing.leases.append(parts[0])
            continue
        if not is_model_dir_name(parts[0]):
            continue
        model = listing.models.setdefault(parts[0], RemoteModel())
        if len(parts) == 2:
            if parts[1] == CONFIG_FILE:
                model.config = entry
            elif parts[1] == STATE_FILE:
                model.state = entry
        elif len(parts) == 3:
            grouped.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = entry
    for name, dirs in grouped.items():
        model = listing.models[name]
        for directory, files in dirs.items():
            if VERSION_RE.match(directory):
                target = model.versions if MANIFEST_FILE in files else model.uncommitted
                target[int(directory)] = files
            elif TMP_RE.match(directory):
                model.staging[directory] = files
    listing.models = {
        name: model
        for name, model in listing.models.items()
        if model.config or model.versions or model.uncommitted or model.staging
    }
    return listing


def manifest_bytes(version: int, files: dict[str, tuple[int, str]], created: str) -> bytes:
    """The manifest of ``version``: ``files`` maps a file name to (size, sha256)."""
    doc = {
        "version": version,
        "created": created,
        "files": {name: {"size": size, "sha256": digest} for name, (size, digest) in files.items()},
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def read_manifest(data: bytes, where: str, version: int) -> dict[str, tuple[int, str]]:
    """A manifest's files as {name: (size, sha256)}; RepositoryError naming ``where`` for
    anything else: not JSON (or nested beyond the parser), not ours, of another version, naming
    an unsafe file (a path, ``.``, ``..``), a size that is not an integer, or no model file."""
    try:
        doc = json.loads(data)
        files = doc["files"]
        if doc["version"] != version or not isinstance(files, dict):
            raise ValueError(f"it records version {doc['version']!r}")
        out = {}
        for name, info in files.items():
            if not _SAFE_FILE.fullmatch(name) or name == "." or name.startswith(".."):
                raise ValueError(f"unsafe file name {name!r}")
            out[name] = (int(info["size"]), str(info["sha256"]))
        if MODEL_FILE not in out:
            raise ValueError(f"it lists no {MODEL_FILE}")
        return out
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise RepositoryError(f"{where} is not a manifest of version {version}: {exc}") from None
