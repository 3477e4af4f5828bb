"""`tiexport validate`: exit codes, formats, unusable input, devices, and the no-torch guarantee."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import tiexport
from fixtures.models import tiny_conv
from tiexport.cli import main
from tiexport.validators.report import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures" / "models"
EXAMPLE = ROOT / "tiexport" / "data" / "example_cnn_qdq.onnx"


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    p = tmp_path / "clean.onnx"
    onnx.save(tiny_conv(), str(p))
    return p


@pytest.fixture
def non_p2(tmp_path: Path) -> Path:
    """Warnings on TDA4VM (non-power-of-2 scales, which TIDL changes at import), clean elsewhere."""
    p = tmp_path / "non_p2.onnx"
    onnx.save(tiny_conv(act_scale=0.03), str(p))
    return p


@pytest.fixture
def asym_weight(tmp_path: Path) -> Path:
    """An error on every TIDL device (weights must be symmetric), nothing on AM62 (no accelerator)."""
    p = tmp_path / "asym_weight.onnx"
    onnx.save(tiny_conv(w_zp=2), str(p))
    return p


def test_clean_model_exits_0(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(clean), "--device", "all"]) == 0
    out = capsys.readouterr().out
    assert "TDA4VM (TIDL 11.0): compatible" in out and "AM68A (TIDL 11.0): compatible" in out


def test_errors_exit_1_only_for_devices_with_errors(asym_weight: Path, non_p2: Path) -> None:
    assert main(["validate", str(asym_weight), "--device", "TDA4VM"]) == 1
    assert main(["validate", str(asym_weight), "--device", "AM62"]) == 0
    assert main(["validate", str(asym_weight), "--device", "AM62", "--device", "AM68A"]) == 1
    assert main(["validate", str(non_p2), "--device", "TDA4VM"]) == 0  # warnings only
    assert main(["validate", str(non_p2), "--device", "TDA4VM", "--fail-on", "warning"]) == 1
    assert main(["validate", str(non_p2), "--device", "AM68A", "--fail-on", "warning"]) == 0


def test_fail_on_levels(tmp_path: Path) -> None:
    p = tmp_path / "warn.onnx"
    onnx.save(tiny_conv(w_folded=False), str(p))  # one warning (unfolded weight), no error
    assert main(["validate", str(p), "-d", "AM68A"]) == 0
    assert main(["validate", str(p), "-d", "AM68A", "--fail-on", "warning"]) == 1
    assert main(["validate", str(p), "-d", "AM68A", "--fail-on", "never"]) == 0


def test_json_schema(non_p2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(non_p2), "-d", "TDA4VM", "-d", "AM68A", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"model", "tiexport_version", "tidl_sdk", "devices"}
    assert doc["model"] == str(non_p2) and doc["tiexport_version"] == tiexport.__version__
    assert doc["tidl_sdk"] == "11.0"  # the latest SDK release by default
    assert list(doc["devices"]) == ["TDA4VM", "AM68A"]
    assert doc["devices"]["TDA4VM"]["verdict"] == "compatible_with_warnings"
    assert doc["devices"]["AM68A"] == {"verdict": "compatible", "findings": []}
    keys = {"rule_id", "category", "severity", "node", "op_type", "message", "hint", "fixable", "source", "advice"}
    for f in doc["devices"]["TDA4VM"]["findings"]:
        assert set(f) == keys
        assert f["category"] in CATEGORIES and f["severity"] in ("error", "warning", "info")
        assert isinstance(f["fixable"], bool) and f["advice"] is False
        assert f["source"].startswith("TexasInstruments/edgeai-tensorlab@r11.0:")
    assert {f["category"] for f in doc["devices"]["TDA4VM"]["findings"]} == {"power_of_two"}


def test_sarif_output_to_file(non_p2: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.sarif"
    assert main(["validate", str(non_p2), "-d", "TDA4VM", "--format", "sarif", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["version"] == "2.1.0"
    run = doc["runs"][0]
    assert run["tool"]["driver"]["name"] == "tiexport"
    assert run["tool"]["driver"]["properties"] == {"tidl_sdk": "11.0"}
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["TIDL020"]
    assert {r["level"] for r in run["results"]} == {"warning"}
    assert {r["properties"]["device"] for r in run["results"]} == {"TDA4VM"}
    assert {(r["properties"]["advice"], r["properties"]["source"][:40]) for r in run["results"]} == {
        (False, "TexasInstruments/edgeai-tensorlab@r11.0:")}
    assert len(run["results"]) == 2


def test_output_refuses_to_overwrite_model(non_p2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = non_p2.read_bytes()
    assert main(["validate", str(non_p2), "--output", str(non_p2)]) == 2
    assert non_p2.read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_text_has_summary_and_hint(non_p2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["validate", str(non_p2), "-d", "TDA4VM"])
    out = capsys.readouterr().out
    assert "TDA4VM (TIDL 11.0): compatible_with_warnings (0 errors, 2 warnings, 0 infos)" in out
    assert "TIDL020 power_of_two" in out and "fix: tiexport fix --device TDA4VM" in out
    assert "source: TexasInstruments/edgeai-tensorlab@r11.0:" in out
    assert "\033[" not in out  # not a TTY: no colour


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda t: t / "missing.onnx", "no such file"),
        (lambda t: t, "is a directory"),
        (lambda t: _write(t, "empty.onnx", b""), "empty file"),
        (lambda t: _write(t, "trunc.onnx", tiny_conv().SerializeToString()[:-37]), "not a valid ONNX protobuf"),
        (lambda t: _write(t, "text.onnx", b"hello, this is not a model\n" * 4), "not a valid ONNX protobuf"),
        (lambda t: _write(t, "png.onnx", b"\x89PNG\r\n\x1a\n" + bytes(range(256))), "not a valid ONNX protobuf"),
    ],
    ids=["missing", "directory", "empty", "truncated", "text", "binary"],
)
def test_unusable_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], make, expect) -> None:
    path = make(tmp_path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tiexport: error: ") and str(path) in err
    assert expect in err
    assert "Traceback" not in err


def test_missing_external_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_conv()
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert main(["validate", str(path), "-d", "AM68A"]) == 0
    (tmp_path / "ext.data").unlink()
    assert main(["validate", str(path), "-d", "AM68A"]) == 2
    err = capsys.readouterr().err
    assert "missing external-data file" in err and err.count("\n") == 1


def test_truncated_external_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(tiny_conv(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:10])
    assert main(["validate", str(path)]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["validate"], ["validate", "x.onnx", "--device", "TDA5"],
                                  ["validate", "x.onnx", "--format", "xml"], ["frobnicate"], []])
def test_usage_errors_exit_2_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_device_aliases_and_all(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(clean), "-d", "j721s2", "-d", "am68pa", "--format", "json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["devices"]) == ["AM68A", "TDA4VM"]
    report = tiexport.validate(str(clean), "all")
    assert list(report.devices) == ["TDA4VM", "AM62A", "AM67A", "AM68A", "AM69A", "AM62"]


def test_am62_runs_everything_on_arm(clean: Path) -> None:
    findings = tiexport.validate(str(clean), "AM62").findings
    assert [(f.category, f.severity) for f in findings] == [("unsupported_op", "info")]


def test_ort_quantize_static_model_compatible_on_am68a_flagged_on_tda4vm() -> None:
    path = FIXTURES / "cnn_ort_qdq.onnx"
    report = tiexport.validate(str(path), ["AM68A", "TDA4VM"])
    assert report.devices["AM68A"].verdict == "compatible"
    tda = report.devices["TDA4VM"]
    # TDA4VM imports it on its own grid (TI deploys such a model there): warnings, with their sources
    assert tda.verdict == "compatible_with_warnings"
    assert {f.category for f in tda.findings if f.severity == "warning"} == {
        "power_of_two", "per_channel", "symmetric", "bias"}


def test_bundled_example_is_the_ort_fixture() -> None:
    assert EXAMPLE.read_bytes() == (FIXTURES / "cnn_ort_qdq.onnx").read_bytes()


def test_cli_never_imports_torch(clean: Path) -> None:
    code = (
        "import sys\n"
        "from tiexport.cli import main\n"
        f"rc = main(['validate', {str(clean)!r}, '--format', 'json'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import tiexport; tiexport.validate\n"
        "assert 'torch' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_console_script_runs(clean: Path) -> None:
    exe = Path(sys.executable).with_name("tiexport")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    res = subprocess.run([str(exe), "validate", str(clean), "-d", "AM68A"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "AM68A (TIDL 11.0): compatible" in res.stdout


def test_info_json(clean: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(clean), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["opset"] == 17 and doc["inputs"] == {"input": [1, 3, 8, 8]} and doc["quantized"] is True
    assert doc["op_types"] == {"DequantizeLinear": 4, "QuantizeLinear": 2, "Conv": 1, "Relu": 1}


def test_save_model_keeps_the_callers_model_intact(tmp_path: Path) -> None:
    from tiexport.onnx_io import save_model

    model = tiny_conv(channels=16, out_channels=64)  # a 9 KB weight: large enough to go to the data file
    before = model.SerializeToString()
    save_model(model, tmp_path / "big.onnx", external_data_threshold=0)  # force the external-data path
    assert model.SerializeToString() == before
    assert (tmp_path / "big.onnx.data").exists()
    assert tiexport.validate(str(tmp_path / "big.onnx"), "AM68A").findings == []


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    from tiexport.onnx_io import save_model, write_text

    save_model(tiny_conv(), tmp_path / "m.onnx")
    write_text(tmp_path / "r.json", "{}")
    for name in ("m.onnx", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o044 == 0o044  # group/other can read, as with open()


def test_rules_lists_every_registered_rule(capsys: pytest.CaptureFixture[str]) -> None:
    from tiexport.validators.registry import RULES

    assert main(["rules", "--format", "json", "--docs"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rule_id"] for r in rows] == [r.id for r in RULES]
    assert len({r["rule_id"] for r in rows}) == len(rows)  # ids are unique
    by_id = {r["rule_id"]: r for r in rows}
    assert by_id["TIDL020"]["devices"] == ["TDA4VM"]  # power-of-2 applies to TDA4VM only
    assert all(r["category"] in CATEGORIES for r in rows)
    # every rule cites its sources, or says it is tiexport advice
    assert [r["rule_id"] for r in rows if not r["sources"]] == ["TIDL031", "TIDL032"]
    assert all(r["advice"] == "every check" for r in rows if not r["sources"])
    assert all(r["severity"] != "error" for r in rows if not r["sources"])
