"""The Python API from several threads at once: validate, fix, parity and snippet of *different* models run
concurrently give exactly the reports (and fixed models, and snippets) that the same calls give one after another.

Each call is made several times in a shuffled order by more threads than cores, so the calls overlap in every
phase (loading, shape inference, rules, passes, ONNX Runtime sessions); a race on shared state (a module-level cache,
a rule instance, the graph-surgeon logger) shows up as a differing result or an exception.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import onnx

import tiexport
from fixtures.malformed import CASES
from fixtures.models import tiny_conv

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "models"
THREADS = 8
REPEATS = 3


def _models() -> dict[str, onnx.ModelProto]:
    """Different models: every catalogue case that is a ModelProto, the clean base and a few committed fixtures."""
    out = {c.name: c.model() for c in CASES if c.model is not None}
    out["clean"] = tiny_conv()
    for name in ("cnn_ort_qdq", "TIDL020_not_power_of_two", "TIDL032_concat_scales", "TIDL022_per_channel"):
        out[name] = onnx.load(str(FIXTURES / f"{name}.onnx"))
    return out


def _serial_then_concurrent(calls: dict[str, Callable[[], Any]]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    serial = {name: call() for name, call in calls.items()}
    jobs = [name for name in calls for _ in range(REPEATS)]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [(name, pool.submit(calls[name])) for name in jobs]
        concurrent = [(name, f.result()) for name, f in futures]
    return serial, concurrent


def _outcome(func: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``func(*args)``'s result, or its error as (type, message): refusals must be as deterministic as results."""
    def run() -> Any:
        try:
            return func(*args)
        except tiexport.TiexportError as exc:
            return (type(exc).__name__, str(exc))
    return run


def _validate(model: onnx.ModelProto) -> str:
    return tiexport.validate(model, "all").to_json()


def _fix(model: onnx.ModelProto) -> tuple[bytes, dict[str, Any]]:
    fixed, report = tiexport.fix(model, "TDA4VM", num_samples=2)
    return fixed.SerializeToString(), report.to_dict()


def _parity(reference: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, Any]:
    return tiexport.check_parity(reference, model, num_samples=2, per_layer=True).to_dict()


def test_validate_from_threads_gives_the_serial_reports() -> None:
    models = _models()
    calls = {name: _outcome(_validate, m) for name, m in models.items()}
    serial, concurrent = _serial_then_concurrent(calls)
    assert len(concurrent) == REPEATS * len(models)
    for name, result in concurrent:
        assert result == serial[name], name


def test_fix_from_threads_gives_the_serial_models_and_reports() -> None:
    models = _models()
    chosen = ["clean", "cnn_ort_qdq", "TIDL020_not_power_of_two", "TIDL032_concat_scales", "TIDL022_per_channel",
              "scale_nan", "cycle", "ir_newer"]
    calls = {name: _outcome(_fix, models[name]) for name in chosen}
    serial, concurrent = _serial_then_concurrent(calls)
    for name, result in concurrent:
        assert result == serial[name], name


def test_parity_from_threads_gives_the_serial_reports() -> None:
    models = _models()
    clean = models["clean"]
    chosen = ["clean", "scale_nan", "scale_zero", "opset_newer", "initializer_shadows_input", "cycle"]
    calls = {name: _outcome(_parity, clean, models[name]) for name in chosen}
    serial, concurrent = _serial_then_concurrent(calls)
    for name, result in concurrent:
        assert result == serial[name], name


def test_snippet_from_threads_gives_the_serial_snippets() -> None:
    models = _models()
    calls = {f"{name}/{fmt}": _outcome(partial(tiexport.snippet, models[name], "AM68A", fmt))
             for name in ("clean", "cnn_ort_qdq", "TIDL022_per_channel", "scale_nan")
             for fmt in ("benchmark", "tidl-json", "yaml")}
    serial, concurrent = _serial_then_concurrent(calls)
    for name, result in concurrent:
        assert result == serial[name], name
