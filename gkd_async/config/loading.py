"""Loading a run's configuration: a YAML file plus dotted command-line overrides, validated by pydantic.

Every error names the key, where its value came from (the file, an override, or the default) and what
would be accepted, so a typo never turns into a silently ignored setting.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gkd_async.config.checks import _check_consistency, _source_of
from gkd_async.config.schema import GKDConfig, valid_keys
from gkd_async.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GKDConfig:
    """Read a YAML config (or start from the defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        for key in _leaf_keys(raw):
            sources[key] = f"file {path}"
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value, override)
        sources[key] = f"override '{override}'"
    try:
        config = GKDConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, sources)) from None
    _check_consistency(config, sources)
    return config


def dump_config(config: GKDConfig) -> str:
    """The config as YAML, fit for files and trackers: a password in pipeline.redis_url reads *** (a
    `${NAME}` reference is kept, it holds no secret); `gkd-async resume` takes the full URL from the run's
    0600 `redis_url` file."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}' is not of the form key.sub=value (e.g. gkd.distill_loss_type=jsd)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{override}': the value is not valid YAML: {exc}") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override '{override}': {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _leaf_keys(raw: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for name, value in raw.items():
        if isinstance(value, Mapping) and value:
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _format_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> str:
    keys = list(valid_keys())
    sections = sorted({k.split(".")[0] for k in keys})
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        source = _source_of(key, sources)
        if err["type"] == "extra_forbidden":
            pool = keys if "." in key else sections
            close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"valid keys start with one of: {', '.join(sections)}"
            lines.append(f"unknown key {key} (from {source}); {hint}")
        else:
            lines.append(f"{key} = {err['input']!r} (from {source}): {err['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines) + "\nrun 'gkd-async config show' to see every key."


def for_teacher(config: GKDConfig, name: str | None) -> GKDConfig:
    """The run's config as one teacher's scorers see it: model.teacher (and the served model's name) set to
    that teacher's model. `name` None: the run's only teacher."""
    if name is None:
        return config
    if name not in config.model.teachers:
        raise ConfigError(f"no teacher named {name!r}: model.teachers has {sorted(config.model.teachers)}")
    spec = config.model.teachers[name]
    copy = config.model_copy(deep=True)
    copy.model.teacher = spec
    if copy.teacher.backend == "openai":
        copy.teacher.openai.model = spec
    return copy
