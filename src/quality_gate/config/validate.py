"""Checking a composed config against its stage's schema, and the schema's keys as a reference.

:func:`validate` checks the allowed values in each field's metadata (``choices``, ``ge``, ``gt``,
``le``, ``name``), each group's ``check_group`` and the cross-field rules of the stage's ``check``;
:func:`make_config` builds a stage's config in Python; :func:`help_rows` lists every key with its
default and help (``--help``, docs/configuration.md).
"""

import dataclasses
import difflib
import math
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from quality_gate.config.resolvers import register_resolvers
from quality_gate.config.stages import SCHEMAS
from quality_gate.errors import ConfigError
from quality_gate.names import check_name


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if value is None:
        return
    if isinstance(value, (list, ListConfig)):
        for i, item in enumerate(value):
            _check_value(f"{key}[{i}]", item, meta)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not supported; use one of {list(choices)}")
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and not ok(value, meta[bound]):
            raise ConfigError(f"{key}={value!r} must be {word} {meta[bound]}")
    if meta.get("name"):
        check_name(str(value), key, dataset=meta["name"] == "dataset")


def _unknown_key(key: str, stage: str, known: list[str]) -> ConfigError:
    """A key the schema does not have (Hydra adds any key given with ``+``): name it and the closest one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(
        f"{key} is not a key of the {stage} config{hint} (Hydra accepts any new key written with +; "
        f"`quality-gate {stage} --help` lists the known ones)"
    )


def _validate_node(node: Any, cls: type, prefix: str, stage: str, known: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    for extra in (k for k in node if k not in names):
        raise _unknown_key(f"{prefix}{extra}", stage, [*(f"{prefix}{n}" for n in names), *known])
    for f in fields:
        key = f"{prefix}{f.name}"
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(f"{key} is not set ({f.metadata.get('help', 'required')})")
        value = node[f.name]
        kind = hints[f.name]
        inner = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if dataclasses.is_dataclass(kind):
            _validate_node(value, kind, f"{key}.", stage, known)
        elif inner is not None and dataclasses.is_dataclass(inner):
            for i, item in enumerate(value):
                _validate_node(item, inner, f"{key}[{i}].", stage, known)
        else:
            _check_value(key, value, dict(f.metadata))
    group_check = getattr(cls, "check_group", None)
    if group_check is not None:
        group_check(node, prefix.rstrip("."))


def validate(cfg: DictConfig) -> DictConfig:
    """Check ``cfg`` against its stage's schema; :class:`ConfigError` names the key. Returns ``cfg``.

    Every key must be one of the schema's (a key added with ``+`` is refused with the closest known
    one), every value within its field's checks, and each stage's cross-field rules hold. Reads no
    file and imports no torch: the command line runs it before Hydra makes a run dir.
    """
    stage = stage_of(cfg)
    schema = SCHEMAS[stage]
    known = [key for key, _, _ in help_rows(schema)]
    try:
        _validate_node(cfg, schema, "", stage, known)
    except KeyError as e:
        raise ConfigError(f"config key {e} is missing; is this a {stage} config?") from None
    check = getattr(schema, "check", None)
    if check is not None:
        check(cfg)
    return cfg


def stage_of(cfg: DictConfig) -> str:
    """The stage of ``cfg`` (``cfg.stage``, one of :data:`SCHEMAS`; the seed's names are mapped to these
    by the command line, :mod:`quality_gate.cli`)."""
    stage = cfg.get("stage")
    if stage not in SCHEMAS:
        raise ConfigError(f"config key `stage` is {cfg.get('stage')!r}; expected one of {sorted(SCHEMAS)}")
    return stage


def make_config(
    stage: str, values: dict[str, Any] | None = None, dotlist: typing.Sequence[str] = ()
) -> DictConfig:
    """The config of ``stage``: its schema's defaults, then ``values`` (dotted keys), then ``dotlist``.

    Equal to what ``quality-gate <stage> <dotlist>`` composes (without the ``hydra`` node); used by
    the experiment runner and tests. Raises :class:`ConfigError` for unknown keys and wrong types.
    """
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    cfg = OmegaConf.structured(SCHEMAS[stage])
    try:
        for key, value in (values or {}).items():
            update = OmegaConf.create({})
            OmegaConf.update(update, key, value, force_add=True)
            cfg = OmegaConf.merge(cfg, update)
        if dotlist:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotlist)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{stage} config: {e}") from None
    return validate(cfg)


def help_rows(schema: type) -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every leaf key of a stage schema (the config reference)."""
    return _help_rows(schema, OmegaConf.to_container(OmegaConf.structured(schema), resolve=False), "")


def _help_rows(cls: type, values: dict[str, Any], prefix: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _help_rows(hints[f.name], values[f.name], f"{key}.")
        else:
            rows.append((key, _show(values[f.name]), str(f.metadata.get("help", ""))))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) if not isinstance(v, dict) else _show_dict(v) for v in value) + "]"
    if isinstance(value, dict):
        return _show_dict(value)
    text = str(value)
    return text.replace("${qg_asset:", "<assets>/").rstrip("}") if text.startswith("${qg_asset:") else text


def _show_dict(value: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items() if v is not None) + "}"


ASSETS_NOTE = "<assets>/ is the tiny assets embedded in the package (./assets in a checkout)."
