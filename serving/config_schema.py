"""Hydra structured configs, strictly: typed values, strict booleans and one-line errors.

Both command-line apps (``fedserve-train`` and ``fedserve-serve``) compose their conf/ files
against dataclass schemas registered in Hydra's ConfigStore, so OmegaConf rejects an unknown key
or a value of the wrong type (``rounds=abc``, ``rounds=2.5``) while composing. Two things are added
here: booleans are strict (OmegaConf reads ``resume=no`` as false; YAML 1.2 and a careful user read
it as a typo, so an override of a bool key must say ``true`` or ``false``), and every such error
becomes one line naming the key, the value and what is expected (:func:`describe_error`), instead
of Hydra's multi-line report. :func:`run_cli` runs a ``@hydra.main`` function that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the fix."""


def typed_config(cfg: DictConfig, schema: type[T]) -> T:
    """``cfg`` (composed against ``schema``) as a validated ``schema`` instance; a ``hydra`` node
    and keys ``schema`` does not have are left out (ConfigError on a '???' left unset)."""
    missing = sorted(missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set (it is '???' in conf/); "
            f"pass it as an override, e.g. {missing[0]}=<value>"
        )
    names = {f.name for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(data, dict)
        typed = OmegaConf.merge(
            OmegaConf.structured(schema), {k: v for k, v in data.items() if k in names}
        )
        config = OmegaConf.to_object(typed)
    except OmegaConfBaseException as err:
        raise ConfigError(describe_error(err)) from err
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config  # type: ignore[return-value]


def check_bool_overrides(overrides: list[str], schema: type) -> None:
    """Refuse ``key=<anything but true/false>`` for a bool key of ``schema``."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(describe_error(err)) from err
    for override in parsed:
        if override.is_sweep_override() or override.is_delete():
            continue
        if field_type(schema, override.key_or_group) is not bool:
            continue
        if not isinstance(override.value(), bool):
            raise ConfigError(
                f"{override.key_or_group}={override.get_value_element_as_str()}: expected a bool "
                "(true or false)"
            )


def describe_error(err: BaseException) -> str:
    """One line for a composition error: the override or key, the value, what is expected."""
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    headline = str(err).splitlines()[0].strip() if str(err) else type(err).__name__
    unknown_key = isinstance(cause, ConfigKeyError | ConfigAttributeError)
    if unknown_key and dataclasses.is_dataclass(cause.object_type):
        allowed = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
        where = cause.full_key or cause.key
        return f"unknown config key '{where}'; allowed there: {allowed}"
    if isinstance(cause, OmegaConfBaseException) and cause.msg:
        reason = cause.msg.splitlines()[0]
        key = cause.full_key or cause.key
        kind = field_type(cause.object_type, str(cause.key)) if cause.object_type else None
        expected = f", expected {_type_name(kind)}" if kind is not None else ""
        if headline == reason:
            return f"{reason} (key {key}{expected})"
        return f"{headline}: {reason} (key {key}{expected})"
    return _one_line(str(err)) or type(err).__name__


def _one_line(text: str) -> str:
    """Hydra's multi-line messages (e.g. a header and a tab-indented list of options) as one."""
    parts: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith(("\t", " ")) and parts and parts[-1].endswith((":", ",")):
            parts[-1] += (" " if parts[-1].endswith(":") else " ") + line.strip() + ","
        else:
            parts.append(line.strip())
    # Hydra appends where it looked; the options above say all a user needs
    kept = [part.rstrip(",") for part in parts if not part.startswith("Config search path")]
    return "; ".join(kept)


def field_type(schema: Any, dotted: str) -> Any:
    """The annotated type of ``dotted`` in dataclass ``schema`` (None when it is not a field)."""
    kind: Any = schema
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(kind):
            return None
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return None
        kind = hints[part]
    return kind


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys left '???' (MISSING) in ``cfg``, the ``hydra`` node excepted."""
    missing: list[str] = []
    for key in cfg:
        if key == "hydra":
            continue
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            missing.append(path)
            continue
        value = cfg[key]
        if isinstance(value, DictConfig):
            missing.extend(missing_keys(value, prefix=f"{path}."))
    return missing


@contextlib.contextmanager
def config_errors_exit(
    program: str, errors: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """A configuration error (Hydra's, OmegaConf's, a :class:`ConfigError`, or one of ``errors``)
    in the block exits 2 with one line on stderr. Use it around a ``@hydra.main`` function's
    body too: an exception leaving it makes Hydra print a line of its own first."""
    try:
        yield
    except (HydraException, OmegaConfBaseException, ConfigError, *errors) as err:
        message = (
            describe_error(err)
            if isinstance(err, HydraException | OmegaConfBaseException)
            else str(err)
        )
        print(f"{program}: invalid configuration: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_cli(
    hydra_main: Callable[[], Any],
    program: str,
    errors: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run a ``@hydra.main`` function under :func:`config_errors_exit`.

    ``HYDRA_FULL_ERROR`` makes Hydra raise composition errors instead of printing its own
    multi-line report, so they can be caught and described here.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with config_errors_exit(program, errors):
        return hydra_main()
