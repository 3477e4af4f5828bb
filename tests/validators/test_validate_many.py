"""`tiexport validate` on several models (a CI job over a folder) and its compact text (``--verbose`` lists all)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from fixtures.models import tiny_conv
from tiexport.cli import main
from tiexport.validators.report import DeviceReport, Finding, Report


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    onnx.save(tiny_conv(), str(tmp_path / "a_clean.onnx"))
    onnx.save(tiny_conv(w_zp=2), str(tmp_path / "b_asym_weight.onnx"))
    (tmp_path / "notes.txt").write_text("not a model")
    return tmp_path


def test_several_models_one_summary_line_each_one_exit_code(folder: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    clean, asym = folder / "a_clean.onnx", folder / "b_asym_weight.onnx"
    assert main(["validate", str(clean), str(asym), "--device", "AM68A"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"AM68A (TIDL 11.0): compatible (0 errors, 0 warnings, 0 infos)  [{clean}]",
                     lines[1]]
    assert lines[1].startswith("AM68A (TIDL 11.0): incompatible (1 error") and lines[1].endswith(f"[{asym}]")
    assert main(["validate", str(clean), str(clean), "--device", "AM68A"]) == 0


def test_a_folder_stands_for_its_onnx_files(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(folder), "--device", "AM68A", "--device", "TDA4VM"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.endswith(".onnx]") for line in out)


def test_unreadable_model_among_several_is_listed_and_exits_2(folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = folder / "missing.onnx"
    assert main(["validate", str(folder / "a_clean.onnx"), str(missing), "--device", "AM68A"]) == 2
    out = capsys.readouterr().out
    assert "compatible" in out and f"unusable: {missing}" in out


def test_json_and_sarif_cover_every_model(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["validate", str(folder), "--device", "AM68A", "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert [Path(m["model"]).name for m in data["models"]] == ["a_clean.onnx", "b_asym_weight.onnx"]
    assert data["models"][1]["devices"]["AM68A"]["verdict"] == "incompatible"
    main(["validate", str(folder), "--device", "AM68A", "--format", "sarif"])
    sarif = json.loads(capsys.readouterr().out)
    results = sarif["runs"][0]["results"]
    uris = {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results}
    assert uris == {str(folder / "b_asym_weight.onnx")}
    rules = [r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]]
    assert all(rules[r["ruleIndex"]] == r["ruleId"] for r in results)


def _report(n: int) -> Report:
    findings = [Finding("TIDL040", "unsupported_op", "warning", f"node{i:03d}", "Foo", "Foo runs on Arm", "replace it")
                for i in range(n)]
    return Report(model="m.onnx", devices={"AM68A": DeviceReport("AM68A", findings)})


def test_text_lists_a_few_nodes_per_rule_and_counts_the_rest() -> None:
    text = _report(300).to_text(max_nodes=5)
    assert len(text.splitlines()) < 12
    assert "node004" in text and "node005" not in text and "... and 295 more (--verbose lists all)" in text
    full = _report(300).to_text()
    assert "node299" in full and "more" not in full
    assert "more" not in _report(6).to_text(max_nodes=5)  # one hidden node is listed rather than counted


def test_verbose_flag_lists_every_node(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tiexport.validators.validate as validate_mod

    monkeypatch.setattr(validate_mod, "validate", lambda *a, **k: _report(40))
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(path))
    main(["validate", str(path), "--device", "AM68A"])
    assert "... and 35 more" in capsys.readouterr().out
    main(["validate", str(path), "--device", "AM68A", "--verbose"])
    out = capsys.readouterr().out
    assert "node039" in out and "more" not in out
