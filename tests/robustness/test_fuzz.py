"""Property-based fuzzing of all four entry points at CI size (a few hundred cases, derandomized).

Field-level mutations (``fixtures.malformed.mutate_model``: op types, wiring, attributes of the wrong type,
initializer types/data/dims, negative input dims, versions, external references) reach the rules and passes; byte
mutations (``mutate_bytes``: flips, truncation) exercise the loaders. validate's own byte-level fuzz lives in
tests/validators/test_fuzz_validate.py and is not repeated here. Properties: every call returns its result or raises
a one-line TiexportError; validate has no rule crash (TIDL000); what fix returns or writes passes the full
onnx.checker and opens in ONNX Runtime, and its input is never changed. The longer run: bench/bench_robustness.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiexport
from fixtures.malformed import Pick, mutate_bytes, mutate_model, mutate_qparams
from tests.robustness.helpers import assert_loadable, cli, digest
from tiexport.errors import TiexportError

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "models").glob("*.onnx"))
BLOBS = [p.read_bytes() for p in FIXTURES if p.stat().st_size < 64_000]
MODELS = [onnx.load_model_from_string(b) for b in BLOBS]
DEVICES = ("TDA4VM", "AM68A", "AM62")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])


def _picker(draw: st.DrawFn) -> Pick:
    return lambda n: draw(st.integers(0, n - 1))


@st.composite
def field_mutated(draw: st.DrawFn) -> bytes:
    return mutate_model(draw(st.sampled_from(MODELS)), _picker(draw))


@st.composite
def byte_mutated(draw: st.DrawFn) -> bytes:
    return mutate_bytes(draw(st.sampled_from(BLOBS)), _picker(draw))


@st.composite
def qparams_mutated(draw: st.DrawFn) -> onnx.ModelProto:
    return mutate_qparams(draw(st.sampled_from(MODELS)), _picker(draw))


any_mutation = st.one_of(field_mutated(), byte_mutated())


@st.composite
def original_and_mutant(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A fixture and a mutant of it (same inputs and outputs unless the mutation broke them): the parity pair."""
    i = draw(st.integers(0, len(MODELS) - 1))
    how = draw(st.integers(0, 2))
    pick = _picker(draw)
    if how == 0:
        return BLOBS[i], mutate_model(MODELS[i], pick)
    if how == 1:
        return BLOBS[i], mutate_bytes(BLOBS[i], pick)
    return BLOBS[i], mutate_qparams(MODELS[i], pick).SerializeToString()


def _one_line(exc: TiexportError) -> None:
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


@settings(FUZZ, max_examples=200)
@given(field_mutated())
def test_validate_survives_field_mutations(blob: bytes) -> None:
    try:
        report = tiexport.validate(blob, "all")
    except TiexportError as exc:
        _one_line(exc)
        return
    assert [f.message for f in report.findings if f.rule_id == "TIDL000"] == []


@settings(FUZZ, max_examples=120)
@given(any_mutation, st.sampled_from(DEVICES))
def test_fix_returns_a_loadable_model_or_one_line_and_keeps_its_input(blob: bytes, device: str) -> None:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(blob)
        source: object = model
    except Exception:
        source = blob  # the loader's own error path
    before = model.SerializeToString() if source is model else None
    try:
        fixed, _ = tiexport.fix(source, device, num_samples=1)
    except TiexportError as exc:
        _one_line(exc)
    else:
        assert_loadable(fixed)
    if before is not None:
        assert model.SerializeToString() == before


@settings(FUZZ, max_examples=80)
@given(qparams_mutated(), st.sampled_from(DEVICES))
def test_fix_of_requantized_models_is_loadable_and_keeps_its_input(model: onnx.ModelProto, device: str) -> None:
    # well-formed graphs with other scales and zero points: mostly rewritten, not refused
    before = model.SerializeToString()
    try:
        fixed, report = tiexport.fix(model, device, num_samples=1)
    except TiexportError as exc:
        _one_line(exc)
    else:
        assert_loadable(fixed)
        assert not [f for f in report.remaining if f.rule_id == "TIDL000"]
    assert model.SerializeToString() == before


@settings(FUZZ, max_examples=80)
@given(original_and_mutant())
def test_parity_reports_or_raises_one_line(pair: tuple[bytes, bytes]) -> None:
    original, mutant = pair
    try:
        report = tiexport.check_parity(original, mutant, num_samples=1)
    except TiexportError as exc:
        _one_line(exc)
        return
    assert isinstance(report.passed, bool)


@settings(FUZZ, max_examples=80)
@given(any_mutation, st.sampled_from(DEVICES), st.sampled_from(("benchmark", "tidl", "tidl-json", "yaml")))
def test_snippet_returns_text_or_raises_one_line(blob: bytes, device: str, fmt: str) -> None:
    try:
        text = tiexport.snippet(blob, device, fmt)
    except TiexportError as exc:
        _one_line(exc)
        return
    assert text.strip()


@settings(FUZZ, max_examples=40)
@given(field_mutated(), st.sampled_from(DEVICES))
def test_fix_cli_writes_a_loadable_model_or_nothing(blob: bytes, device: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "out" / "fixed.onnx"
        src.write_bytes(blob)
        out.parent.mkdir()
        before = digest(src)
        rc, _, err = cli("fix", str(src), "-o", str(out), "-d", device, "-n", "1")
        assert digest(src) == before
        assert rc in (0, 1, 2)
        if rc == 2:
            assert err.count("\n") == 1 and err.startswith("tiexport: error: "), err
            assert list(out.parent.iterdir()) == []
        else:
            assert list(out.parent.iterdir()) == [out]
            assert_loadable(out)
