"""Property-based fuzzing of validate: mutated or truncated fixture protobufs never raise anything but a
TiexportError, and no rule crashes (no TIDL000 "rule could not check" finding)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiexport
from tiexport.errors import TiexportError

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "models").glob("*.onnx"))
BLOBS = [p.read_bytes() for p in FIXTURES if p.stat().st_size < 64_000]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(BLOBS)))
    kind = draw(st.sampled_from(["flip", "truncate", "duplicate", "delete"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        a = draw(st.integers(0, len(data) - 1))
        b = min(len(data), a + draw(st.integers(1, 64)))
        if kind == "duplicate":
            data[a:a] = data[a:b]
        else:
            del data[a:b]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(mutated())
def test_mutated_models_give_findings_or_clean_errors(blob: bytes) -> None:
    try:
        report = tiexport.validate(blob, "all")
    except TiexportError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    crashed = [f.message for f in report.findings if f.rule_id == "TIDL000"]
    assert crashed == []
