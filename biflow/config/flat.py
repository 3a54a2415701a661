"""Configs as flat dicts (`{"forward.width": 64, ...}`: the keys of MLflow params and Tune axes) and as commented
YAML (`biflow config show`)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from pydantic import BaseModel


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"section.key": value}; the inverse of `unflatten`."""
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        *parents, leaf = k.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def commented_yaml(cfg: BaseModel, max_column: int = 44) -> str:
    """The config as YAML with every field's description as a `# comment` beside it (aligned up to max_column).

    Every field is shown, defaults included and `size:` expanded; the text loads back as the same config.
    """
    rows = list(_commented_rows(cfg, ""))
    column = min(max(len(text) for text, _ in rows), max_column)
    return "".join(f"{text:<{column}}  # {note}\n" if note else f"{text}\n" for text, note in rows)


def _commented_rows(cfg: BaseModel, indent: str) -> Iterator[tuple[str, str]]:
    for name, field in type(cfg).model_fields.items():
        value, note = getattr(cfg, name), field.description or ""
        if isinstance(value, BaseModel):
            yield f"{indent}{name}:", note
            yield from _commented_rows(value, indent + "  ")
        else:
            if isinstance(value, list):  # e.g. reverse_loss.perceptual_terms: a list of sections
                value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
            text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
            yield f"{indent}{name}: {text.removesuffix('...').strip()}", note
