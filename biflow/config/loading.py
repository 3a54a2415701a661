"""Reading a config: YAML files, `--set a.b=value` overrides and sweep settings through one `apply_overrides`,
validation with one-line errors that name the key and where its value came from (the file, or the `--set` item),
with the closest known name for a misspelt key or section."""
from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from biflow.config.sections import ConfigError, ExperimentConfig

M = TypeVar("M", bound=BaseModel)

Override = tuple[str, Any]  # (dotted key, value)


@dataclass(frozen=True)
class Origin:
    """Where a value came from, as an error names it: `--set a.b=1` (which shows its key), a file, `trial`."""

    text: str
    key: str | None = None  # the dotted key `text` shows, if it shows one

    def at(self, loc: str) -> str:
        """The head of an error about `loc`: the --set item alone when it already shows loc, else `<text>: <loc>`."""
        loc = loc or "<root>"
        if self.key is not None and (self.key == loc or self.key.startswith(loc + ".")):
            return self.text
        return f"{self.text}: {loc}"


Blame = dict[str, Origin]  # dotted key -> the override that set it, in the order applied


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice that `word` most likely misspells (difflib), or None."""
    match = difflib.get_close_matches(word, sorted(choices), n=1)
    return match[0] if match else None


def unknown(name: str, choices: Iterable[str], what: str = "key") -> str:
    """`unknown key 'algn' (did you mean 'align'?)` (without the hint when nothing is close)."""
    hint = closest(name, choices)
    return f"unknown {what} {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")


def apply_overrides(data: dict, overrides: Mapping[str, Any] | Iterable[str | Override], source: str = "--set") -> Blame:
    """Set dotted keys in `data`, in place: `a.b=value` strings (the value parsed as YAML) or (key, value) pairs.

    The one way settings are layered: `--set` items over a config file, a sweep's fixed settings and axis values
    over its pipeline. Missing sections are created (an empty `section:` is one). Returns who set each key, for
    `build_config` to blame: a string item is named as `<source> a.b=value`, a pair by `source` alone.
    """
    blame: Blame = {}
    for item in overrides.items() if isinstance(overrides, Mapping) else overrides:
        key, value, origin = _parse_override(item, source) if isinstance(item, str) else (*item, Origin(source))
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{origin.at(key)}: {'.'.join(parents[:i + 1])} is a setting, not a section")
        node[leaf] = copy.deepcopy(value)
        blame.pop(key, None)  # the last override of a key is the one in effect
        blame[key] = origin
    return blame


def _parse_override(item: str, source: str) -> tuple[str, Any, Origin]:
    """`a.b=value` -> ("a.b", the value parsed as YAML, `<source> a.b=value`)."""
    key, sep, raw = item.partition("=")
    origin = Origin(f"{source} {item}", key.strip())
    if not sep or not origin.key:
        raise ConfigError(f"{origin.text}: expected key=value")
    try:
        return origin.key, yaml.safe_load(raw), origin
    except yaml.YAMLError:
        raise ConfigError(f"{origin.text}: the value is not valid YAML") from None


def _origin(loc: str, blame: Blame, where: str) -> Origin:
    """Who set the value at `loc`: the last override of it, of a key inside it, or of the mapping holding it."""
    for key, origin in reversed(blame.items()):
        if key == loc or loc.startswith(key + ".") or key.startswith(loc + "."):
            return origin
    return Origin(where)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (`Model` or `Model | None`); None for a value or a free-form mapping."""
    options = get_args(annotation) or (annotation,)
    models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if len(models) == 1 else None


def check_keys(model: type[BaseModel], data: dict, where: str, blame: Blame | None = None, prefix: str = "") -> None:
    """Every key in `data` names a field of `model` (through its sections); an unknown one is a ConfigError that
    names whoever set it and the closest known name: `--set revers.depth=3: unknown section 'revers' (did you
    mean 'reverse'?)`, `exp.yaml: forward.widht: unknown key 'widht' (did you mean 'width'?)`."""
    fields = model.model_fields
    for name, value in data.items():
        loc = f"{prefix}{name}"
        if name not in fields:
            what = "section" if isinstance(value, dict) else "key"
            raise ConfigError(f"{_origin(loc, blame or {}, where).at(loc)}: {unknown(str(name), fields, what)}")
        section = _section_model(fields[name].annotation)
        if section is not None and isinstance(value, dict):
            check_keys(section, value, where, blame, loc + ".")


def validate(model: type[M], data: dict, where: str = "config", blame: Blame | None = None) -> M:
    """Build `model` from a dict; any problem becomes a one-line ConfigError naming the key and where its value
    came from: the override in `blame` that set it, else `where`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        extra = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{_origin(loc, blame or {}, where).at(loc)}: {msg}{extra}") from None


def build_config(model: type[M], data: dict, where: str, blame: Blame | None = None) -> M:
    """`check_keys`, then `validate`: a config from data that a file and overrides made."""
    check_keys(model, data, where, blame)
    return validate(model, data, where, blame)


def read_yaml_mapping(path: str | Path, what: str = "file") -> dict:
    """A YAML file whose top level is a mapping (safe_load); a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, model: type[M] = ExperimentConfig, overrides: Iterable[str] = ()) -> tuple[M, dict]:
    """(the validated config, the data it was built from): a YAML file (None: all defaults) with `a.b=value`
    overrides on top. A sweep builds its trials from the data, so a swept `size` still fills what the file leaves out."""
    where = str(path) if path is not None else "config"
    data = {} if path is None else read_yaml_mapping(path, "config file")
    data = {k: {} if v is None else v for k, v in data.items()}  # an empty `section:` means its defaults
    blame = apply_overrides(data, overrides)
    return build_config(model, data, where, blame), data


def load_yaml(path: str | Path | None, model: type[M] = ExperimentConfig, overrides: Iterable[str] = ()) -> M:
    """Load and validate a YAML config (None: all defaults); `overrides` are `a.b=value` strings (YAML-parsed)."""
    return load_config(path, model, overrides)[0]
