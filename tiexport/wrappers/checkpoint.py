"""``load_weights``: load what fits from a checkpoint into a model or a wrapper, and report the rest."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from tiexport.errors import UnusableInputError
from tiexport.wrappers.base import QuantWrapper

__all__ = ["LoadReport", "load_weights"]

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """Which entries of a checkpoint went into the module and which did not."""

    loaded: list[str]
    missing: list[str]  # in the module, not in the checkpoint
    unexpected: list[str]  # in the checkpoint, not in the module
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, checkpoint shape, module shape)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"shape-mismatched {len(self.shape_mismatched)}"
        )


_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _read_state_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise UnusableInputError(f"{path}: no such checkpoint file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UnusableInputError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, Mapping):
            raise UnusableInputError(f"{path}: holds a {type(state).__name__}, not a state dict")
        state = dict(state)
    for key in _CHECKPOINT_KEYS:  # common training-script layouts: {"state_dict": ..., "epoch": ...}
        nested = state.get(key)
        if isinstance(nested, Mapping) and not any(isinstance(v, torch.Tensor) for k, v in state.items() if k != key):
            state = dict(nested)
            break
    if state and all(k.startswith("module.") for k in state):  # saved from DDP or from a wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(module: torch.nn.Module, path_or_state_dict: str | Path | Mapping[str, Any]) -> LoadReport:
    """Load what fits from a checkpoint into ``module`` (a wrapper loads into its ``.module``) and report the rest.

    Entries whose shape differs are skipped and reported, except quantization parameters (fake-quant scale and zero
    point, per-channel observer ranges), whose shape comes from the data and is taken from the checkpoint.
    """
    target = module.module if isinstance(module, QuantWrapper) else module
    state = _read_state_dict(path_or_state_dict)
    own = target.state_dict()
    resizable = {
        f"{name}.{buf}" if name else buf
        for name, m in target.named_modules()
        if isinstance(m, FakeQuantizeBase) or hasattr(m, "min_val")
        for buf, _ in m.named_buffers(recurse=False)
    }
    loadable: dict[str, Any] = {}
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, value in state.items():
        if key not in own:
            continue
        mine = own[key]
        if isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor) and value.shape != mine.shape and (
            key not in resizable
        ):
            mismatched.append((key, tuple(value.shape), tuple(mine.shape)))
            continue
        loadable[key] = value
    result = target.load_state_dict(loadable, strict=False)
    report = LoadReport(
        loaded=sorted(loadable),
        missing=sorted(k for k in result.missing_keys if k not in {m[0] for m in mismatched}),
        unexpected=sorted(k for k in state if k not in own),
        shape_mismatched=mismatched,
    )
    log.info("load_weights: %s", report.summary())
    for key in report.missing:
        log.info("  missing: %s", key)
    for key in report.unexpected:
        log.info("  unexpected: %s", key)
    for key, theirs, mine_shape in report.shape_mismatched:
        log.warning("  shape mismatch: %s checkpoint %s, module %s", key, theirs, mine_shape)
    return report
