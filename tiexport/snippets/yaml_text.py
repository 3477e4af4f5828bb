"""A small YAML emitter for the edgeai-modelzoo style config: plain or JSON-quoted scalars (a JSON string is a valid
YAML double-quoted scalar), flow lists, nested mappings, trailing comments. No PyYAML needed on the ONNX side."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Commented", "yaml_lines"]


@dataclass(frozen=True)
class Commented:
    """A scalar or short list emitted with a trailing YAML comment."""

    value: Any
    comment: str


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_YAML_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _yaml_str(s: str) -> str:
    if _PLAIN.fullmatch(s) and s.lower() not in _YAML_RESERVED:
        return s
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def _yaml_scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        text = repr(v)
        # YAML 1.1 (PyYAML) reads 1e-05 as a string: it needs a dot in the mantissa
        if "e" in text and "." not in text.split("e")[0]:
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp}"
        return text
    if isinstance(v, str):
        return _yaml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    if isinstance(v, Mapping):  # a flow mapping (entries of a list such as input_details)
        return "{" + ", ".join(f"{_yaml_str(str(k))}: {_yaml_scalar(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot emit {type(v).__name__} as a YAML scalar")


def yaml_lines(data: Mapping[str, Any], indent: int = 0) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    for k, v in data.items():
        key = _yaml_str(str(k))
        if isinstance(v, Commented):
            out.append(f"{pad}{key}: {_yaml_scalar(v.value)}  # {v.comment}")
        elif isinstance(v, Mapping) and v:
            out.append(f"{pad}{key}:")
            out.extend(yaml_lines(v, indent + 1))
        else:
            out.append(f"{pad}{key}: {_yaml_scalar(v)}")
    return out
