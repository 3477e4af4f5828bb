"""The malformed-model catalogue (fixtures/malformed.py) through all four entry points, CLI and Python API.

Every case gives its expected finding or its one-line error; ``fix`` writes only models that pass the full
onnx.checker and open in ONNX Runtime, never changes its input (sha256 of every file in the folder), and leaves no
temporary file behind when it refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import tiexport
from fixtures.malformed import CASES, MalformedCase, clean_model, write_model
from tests.robustness.helpers import assert_loadable, assert_one_line, cli, folder_digest
from tiexport.errors import TiexportError, UnusableInputError
from tiexport.snippets import IncompatibleModelError

IDS = [c.name for c in CASES]
MODEL_CASES = [c for c in CASES if c.model is not None]


@pytest.fixture
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean model the cases were mutated from: the parity reference."""
    folder = tmp_path_factory.mktemp("reference")
    return write_model(clean_model(), folder / "clean.onnx")


def _matching(case: MalformedCase, findings: list[dict[str, object]]) -> list[dict[str, object]]:
    assert case.message is not None
    return [f for f in findings if f["rule_id"] == case.rule_id and f["category"] == case.category
            and case.message in str(f["message"])]


def _error_findings(path: Path, case: MalformedCase) -> list[tiexport.Finding]:
    return [f for f in tiexport.validate(str(path), case.device).findings if f.severity == "error"]


# ================================================================================================= CLI
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_validate_cli(case: MalformedCase, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    before = folder_digest(tmp_path)
    rc, out, err = cli("validate", str(path), "-d", case.device, "--format", "json")
    assert folder_digest(tmp_path) == before
    if case.unusable:
        assert rc == 2
        assert_one_line(err, case.error)
        assert str(path) in err and out == ""
        return
    assert err == ""
    findings = json.loads(out)["devices"][case.device]["findings"]
    assert _matching(case, findings), findings
    assert not [f for f in findings if f["rule_id"] == "TIDL000"]  # no rule crashed on it
    assert rc == (1 if any(f["severity"] == "error" for f in findings) else 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fix_cli(case: MalformedCase, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = case.make(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fixed.onnx"
    before = folder_digest(src)
    rc, stdout, err = cli("fix", str(path), "-o", str(out), "-d", case.device, "-n", "2", "--format", "json")
    assert folder_digest(src) == before  # the input and its side files are untouched
    expected = case.fix_outcome
    if isinstance(expected, str):
        assert rc == 2
        assert_one_line(err, expected)
        assert list(out_dir.iterdir()) == []  # nothing written, no temporary file left
        return
    assert rc == expected, err
    assert list(out_dir.iterdir()) == [out]
    assert_loadable(out)
    assert json.loads(stdout)["output"] == str(out)  # stdout is the JSON summary and nothing else


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity_cli(case: MalformedCase, tmp_path: Path, ref: Path) -> None:
    path = case.make(tmp_path)
    before = folder_digest(tmp_path)
    rc, out, err = cli("parity", str(path), "-r", str(ref), "-n", "2", "--format", "json")
    assert folder_digest(tmp_path) == before
    expected = case.parity_outcome
    if isinstance(expected, str):
        assert rc == 2
        assert_one_line(err, expected)  # ONNX Runtime's own error log is silenced: one line, ours
        return
    assert rc == expected, err
    assert json.loads(out)["passed"] is (expected == 0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_snippet_cli(case: MalformedCase, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    before = folder_digest(tmp_path)
    rc, out, err = cli("snippet", str(path), "-d", case.device)
    assert folder_digest(tmp_path) == before
    if case.unusable:
        assert rc == 2
        assert_one_line(err, case.error)
        return
    errors = _error_findings(path, case)
    if not errors:
        assert rc == 0, err
        compile(out, "snippet", "exec")  # the benchmark entry is Python
        return
    assert rc == 1 and out == ""
    assert err.splitlines()[-1].startswith("tiexport: ") and "not compatible" in err.splitlines()[-1]
    if case.rule_id is not None and any(f.rule_id == case.rule_id for f in errors):
        assert case.rule_id in err  # the findings are listed above the verdict


# ================================================================================================= Python API
def _api(entry: str, src: object, case: MalformedCase, ref: Path) -> object:
    if entry == "validate":
        return tiexport.validate(src, case.device)
    if entry == "fix":
        return tiexport.fix(src, case.device, num_samples=2)
    if entry == "parity":
        return tiexport.check_parity(str(ref), src, num_samples=2)
    return tiexport.snippet(src, case.device, "benchmark")


@pytest.mark.parametrize("entry", ["validate", "fix", "parity", "snippet"])
@pytest.mark.parametrize("case", [c for c in CASES if c.unusable], ids=[c.name for c in CASES if c.unusable])
def test_api_unusable_file_raises_one_line(case: MalformedCase, entry: str, tmp_path: Path, ref: Path) -> None:
    path = case.make(tmp_path)
    with pytest.raises(UnusableInputError) as info:
        _api(entry, str(path), case, ref)
    assert case.error is not None and case.error in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", [c for c in CASES if not c.unusable], ids=[c.name for c in CASES if not c.unusable])
def test_api_validate_reports_the_finding(case: MalformedCase, tmp_path: Path) -> None:
    report = tiexport.validate(str(case.make(tmp_path)), case.device)
    findings = [f.to_dict() for f in report.findings]
    assert _matching(case, findings), findings
    assert not [f for f in findings if f["rule_id"] == "TIDL000"]


@pytest.mark.parametrize("case", [c for c in CASES if not c.unusable], ids=[c.name for c in CASES if not c.unusable])
def test_api_fix_returns_a_loadable_model_or_refuses(case: MalformedCase, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    before = folder_digest(tmp_path)
    expected = case.fix_outcome
    if isinstance(expected, str):
        with pytest.raises(TiexportError) as info:
            tiexport.fix(str(path), case.device, num_samples=2)
        assert expected in str(info.value) and "\n" not in str(info.value)
    else:
        fixed, report = tiexport.fix(str(path), case.device, num_samples=2)
        assert_loadable(fixed)
        assert report.exit_code == expected
    assert folder_digest(tmp_path) == before


@pytest.mark.parametrize("case", [c for c in CASES if not c.unusable], ids=[c.name for c in CASES if not c.unusable])
def test_api_parity_reports_or_raises_one_line(case: MalformedCase, tmp_path: Path, ref: Path) -> None:
    path = case.make(tmp_path)
    expected = case.parity_outcome
    if isinstance(expected, str):
        with pytest.raises(TiexportError) as info:
            tiexport.check_parity(str(ref), str(path), num_samples=2)
        assert expected in str(info.value) and "\n" not in str(info.value)
        return
    report = tiexport.check_parity(str(ref), str(path), num_samples=2)
    assert report.passed is (expected == 0)


@pytest.mark.parametrize("case", [c for c in CASES if not c.unusable], ids=[c.name for c in CASES if not c.unusable])
def test_api_snippet_refuses_with_the_findings(case: MalformedCase, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    errors = _error_findings(path, case)
    if not errors:
        compile(tiexport.snippet(str(path), case.device, "benchmark"), "snippet", "exec")
        return
    with pytest.raises(IncompatibleModelError) as info:
        tiexport.snippet(str(path), case.device, "benchmark")
    assert {(f.rule_id, f.message) for f in info.value.findings} >= {(f.rule_id, f.message) for f in errors}


# ================================================================================================= ModelProto input
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_model_proto_gives_the_same_findings_as_the_file(case: MalformedCase, tmp_path: Path) -> None:
    assert case.model is not None
    from_file = tiexport.validate(str(case.make(tmp_path)), case.device).findings
    from_proto = tiexport.validate(case.model(), case.device).findings
    assert [(f.rule_id, f.node, f.message) for f in from_proto] == [(f.rule_id, f.node, f.message) for f in from_file]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_fix_never_changes_the_callers_model_proto(case: MalformedCase) -> None:
    assert case.model is not None
    model = case.model()
    before = model.SerializeToString()
    try:
        fixed, _ = tiexport.fix(model, case.device, num_samples=1)
    except TiexportError as exc:
        assert isinstance(case.fix_outcome, str) and case.fix_outcome in str(exc)
    else:
        assert not isinstance(case.fix_outcome, str)
        assert isinstance(fixed, onnx.ModelProto) and fixed is not model
    assert model.SerializeToString() == before
