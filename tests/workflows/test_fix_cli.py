"""``tiexport fix``: writes OUT atomically, never touches MODEL, exit codes 0/1/2, text and JSON summaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures.models import tiny_conv
from tests.passes.helpers import assert_valid, const, node
from tiexport.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return _save(tiny_conv(act_scale=0.03, w_per_channel=True, act_zp=3), tmp_path / "model.onnx")


def test_writes_the_fixed_model_and_exits_0(model_path: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = model_path.read_bytes()
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(model_path), "-o", str(out), "--device", "TDA4VM", "-n", "2"]) == 0
    assert model_path.read_bytes() == before
    fixed = onnx.load(str(out))
    assert_valid(fixed)
    text = capsys.readouterr().out
    assert "EnforcePowerOfTwoScalesPass" in text and "ConvertPerChannelToPerTensorPass" in text
    assert "parity vs input (2 sample(s), tolerance 1 LSB)" in text and "no errors remain for TDA4VM" in text


def test_refuses_to_overwrite_the_model(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = model_path.read_bytes()
    assert main(["fix", str(model_path), "-o", str(model_path), "-d", "TDA4VM"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
    assert model_path.read_bytes() == before


def test_in_place_rewrites_the_model(model_path: Path) -> None:
    before = model_path.read_bytes()
    assert main(["fix", str(model_path), "--in-place", "-d", "TDA4VM", "--no-parity"]) == 0
    assert model_path.read_bytes() != before
    assert_valid(onnx.load(str(model_path)))


def test_output_is_required_without_in_place(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fix", str(model_path), "-d", "TDA4VM"]) == 2
    assert "-o OUT is required" in capsys.readouterr().err


def test_remaining_errors_exit_1_and_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tiny_conv(opset=21), tmp_path / "opset21.onnx")
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(path), "-o", str(out), "-d", "AM68A", "--no-parity"]) == 1
    assert out.exists()
    text = capsys.readouterr().out
    assert "error TIDL003" in text and "remain that no pass can fix" in text


def test_json_summary(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(model_path), "-o", str(out), "-d", "TDA4VM", "--format", "json", "-n", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"model", "output", "device", "passes", "parity", "remaining_findings"} <= set(data)
    assert data["output"] == str(out) and data["device"] == "TDA4VM" and data["model"] == str(model_path)
    p2 = next(p for p in data["passes"] if p["name"] == "EnforcePowerOfTwoScalesPass")
    assert p2["changes"] > 0 and p2["numerics_changed"] is True
    assert set(data["parity"]["outputs"]) == {o.name for o in onnx.load(str(out)).graph.output}
    assert all(f["severity"] != "error" for f in data["remaining_findings"])


def test_input_shape_pins_dimensions(tmp_path: Path) -> None:
    path = _save(tiny_conv(batch="N", size="S"), tmp_path / "dyn.onnx")
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(path), "-o", str(out), "-d", "AM68A", "--input-shape", "input:1x3x8x8", "-n", "1"]) == 0
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 8, 8]


@pytest.mark.parametrize("shape", ["input:1x3", "image:1x3x8x8", "input:1xfoo", "input"])
def test_bad_input_shape_exits_2_and_writes_nothing(tmp_path: Path, shape: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tiny_conv(batch="N"), tmp_path / "dyn.onnx")
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(path), "-o", str(out), "-d", "AM68A", "--input-shape", shape]) == 2
    assert not out.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_parity_on_an_npz(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, input=np.random.default_rng(0).random((5, 1, 3, 8, 8), dtype=np.float32))
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(model_path), "-o", str(out), "-d", "AM68A", "--inputs", str(npz),
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["samples"] == 5


def test_unusable_model_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tiny_conv(act_dtype="int16"), tmp_path / "int16.onnx")  # ONNX Runtime rejects it at opset 17
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(path), "-o", str(out), "-d", "AM68A"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".fixed.onnx*"))
    assert "already fails" in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fix", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx"), "-d", "AM68A"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_missing_output_folder_exits_2(model_path: Path, tmp_path: Path) -> None:
    assert main(["fix", str(model_path), "-o", str(tmp_path / "no" / "o.onnx"), "-d", "AM68A"]) == 2


def test_device_is_required(model_path: Path, tmp_path: Path) -> None:
    assert main(["fix", str(model_path), "-o", str(tmp_path / "o.onnx")]) == 2


def test_an_existing_output_is_replaced_without_leftovers(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    out.write_bytes(b"old")
    assert main(["fix", str(model_path), "-o", str(out), "-d", "AM68A", "--no-parity"]) == 0
    assert_valid(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx", "model.onnx"]


def test_power_of_two_nearest(tmp_path: Path) -> None:
    path = _save(tiny_conv(act_scale=0.3), tmp_path / "m.onnx")
    out = tmp_path / "fixed.onnx"
    assert main(["fix", str(path), "-o", str(out), "-d", "TDA4VM", "--power-of-two", "nearest", "--no-parity"]) == 0
    fixed = onnx.load(str(out))
    assert float(const(fixed, node(fixed, "relu_q_QuantizeLinear").input[1])) == 0.25


def test_no_quantize_bias_keeps_a_float_bias(tmp_path: Path) -> None:
    path = _save(tiny_conv(bias="float"), tmp_path / "m.onnx")
    out = tmp_path / "fixed.onnx"
    main(["fix", str(path), "-o", str(out), "-d", "TDA4VM", "--no-quantize-bias", "--no-parity"])
    fixed = onnx.load(str(out))
    assert node(fixed, "conv").input[2] in {t.name for t in fixed.graph.initializer}


def test_console_script_runs_without_importing_torch(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    code = ("import sys; from tiexport.cli import main; "
            f"rc = main(['fix', {str(model_path)!r}, '-o', {str(out)!r}, '-d', 'TDA4VM', '-n', '1']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tiexport fix:" in proc.stdout
