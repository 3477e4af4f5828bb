"""Every rule cites its sources (TI's documents at a release branch, TI's benchmark/model zoo, or the ONNX
specification) or says it is tiexport advice; advice is never an error, and the mark reaches text, JSON, SARIF and
``tiexport rules``. (fixtures/check_citations.py checks each citation against fetched copies of TI's repositories;
it needs the mirrors, so it is a script, not a test.)"""

from __future__ import annotations

import json
import re

import pytest

import tiexport
from fixtures.op_fixtures import OP_FIXTURES
from fixtures.rule_fixtures import RULE_FIXTURES
from tiexport.cli import main
from tiexport.tidl_spec import SDK_VERSIONS, get_spec
from tiexport.validators.registry import RULES
from tiexport.validators.report import Finding

CITATION = re.compile(
    r"^(TexasInstruments/edgeai-(tidl-tools|tensorlab)@(rel_\d\d_\d\d|r\d+\.\d+|[0-9a-f]{8,40}):\S+(#L\d+| §.+)?"
    r"|onnx/onnx@main:docs/\S+( .+)?)$")


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_every_rule_is_sourced_or_advice(rule: object) -> None:
    sources = type(rule).sources
    assert all(CITATION.match(s) for s in sources), sources
    if not sources:
        # tiexport advice through and through: warnings at most
        assert type(rule).severity != "error"
    assert sources or not type(rule).advice_parts, "advice_parts names the unsourced part of a sourced rule"


def test_advice_findings_cannot_be_errors() -> None:
    with pytest.raises(ValueError, match="advice"):
        Finding("TIDL031", "redundant_qdq", "error", "", "", "m", "h", False, advice=True)
    with pytest.raises(ValueError, match="advice"):
        Finding("TIDL031", "redundant_qdq", "warning", "", "", "m", "h", False, source="x", advice=True)


MODELS = {**{k: v[0] for k, v in RULE_FIXTURES.items()}, **OP_FIXTURES}


@pytest.mark.parametrize("sdk", SDK_VERSIONS)
def test_every_finding_names_its_source_or_is_advice(sdk: str) -> None:
    seen_advice = seen_sourced = 0
    for name, build in MODELS.items():
        for f in tiexport.validate(build(), "all", sdk=sdk).findings:
            if f.advice:
                assert not f.source and f.severity != "error", (name, f)
                seen_advice += 1
            else:
                assert CITATION.match(f.source), (name, f)
                seen_sourced += 1
            if f.source.startswith("TexasInstruments/edgeai-tidl-tools@rel_") and "supported_ops" in f.source:
                # operator-table citations point at the release checked
                assert f"@{get_spec(sdk).branch}:" in f.source, f
    assert seen_advice and seen_sourced


def test_advice_is_marked_in_text_json_and_sarif(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(RULE_FIXTURES["TIDL031_dq_q_same_params"][0](), str(path))
    main(["validate", str(path), "-d", "AM68A"])
    text = capsys.readouterr().out
    assert "[tiexport advice: no TI source]" in text
    main(["validate", str(path), "-d", "AM68A", "--format", "json"])
    (finding,) = json.loads(capsys.readouterr().out)["devices"]["AM68A"]["findings"]
    assert (finding["advice"], finding["source"]) == (True, "")
    main(["validate", str(path), "-d", "AM68A", "--format", "sarif"])
    (result,) = json.loads(capsys.readouterr().out)["runs"][0]["results"]
    assert result["properties"]["advice"] is True
    main(["rules"])
    rules_text = capsys.readouterr().out
    block = rules_text[rules_text.index("TIDL031"):rules_text.index("TIDL032")]
    assert "tiexport advice" in block
