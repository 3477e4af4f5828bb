"""`tiexport parity`: exit codes, formats, unusable input, the progress bar, and no torch on the ONNX-vs-ONNX path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.parity.test_parity import MIDDLE, corrupt_scale, three_layer
from tiexport.cli import main
from tiexport.progress import ProgressBar


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    ref = three_layer()
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(corrupt_scale(ref, MIDDLE, 1.7), tmp_path / "bad.onnx")
    return tmp_path / "ref.onnx", tmp_path / "bad.onnx"


def test_identical_models_exit_0(models, capsys) -> None:
    ref, _ = models
    assert main(["parity", str(ref), "--reference", str(ref)]) == 0
    out = capsys.readouterr()
    assert "verdict: PASSED" in out.out
    assert out.err == ""  # no progress bar when stderr is not a TTY


def test_corrupted_model_exits_1_and_json_names_the_layer(models, capsys) -> None:
    ref, bad = models
    assert main(["parity", str(bad), "-r", str(ref), "--per-layer", "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False
    assert data["first_divergence"]["node"] == "layer1_dq_DequantizeLinear"
    assert data["layers"]


def test_max_lsb_option_changes_the_verdict(models, capsys) -> None:
    ref, bad = models
    assert main(["parity", str(bad), "-r", str(ref), "--format", "json"]) == 1
    (metrics,) = json.loads(capsys.readouterr().out)["outputs"].values()
    assert main(["parity", str(bad), "-r", str(ref), "--max-lsb", str(metrics["min_lsb_to_pass"])]) == 0


def test_atol_option_applies_allclose(models, capsys) -> None:
    ref, bad = models
    assert main(["parity", str(bad), "-r", str(ref), "--atol", "1", "--format", "json"]) == 0
    (metrics,) = json.loads(capsys.readouterr().out)["outputs"].values()
    assert metrics["criterion"] == "allclose"


def test_output_file_and_refusal_to_overwrite_inputs(models, tmp_path, capsys) -> None:
    ref, bad = models
    report = tmp_path / "report.json"
    assert main(["parity", str(bad), "-r", str(ref), "--format", "json", "-o", str(report)]) == 1
    assert json.loads(report.read_text())["passed"] is False
    before = bad.read_bytes()
    assert main(["parity", str(bad), "-r", str(ref), "-o", str(bad)]) == 2
    assert bad.read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_npz_inputs(models, tmp_path, capsys) -> None:
    ref, _ = models
    np.savez(tmp_path / "in.npz", input=np.random.default_rng(0).random((4, 1, 3, 8, 8)).astype(np.float32))
    assert main(["parity", str(ref), "-r", str(ref), "--inputs", str(tmp_path / "in.npz"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 4


@pytest.mark.parametrize(
    "case",
    ["missing_candidate", "not_onnx", "torch_reference", "npz_wrong_key", "npz_missing", "dynamic_dims",
     "zero_samples", "bad_max_lsb", "no_reference"],
)
def test_unusable_input_exits_2_with_one_line(case, models, tmp_path, capsys) -> None:
    ref, _ = models
    args = ["parity", str(ref), "-r", str(ref)]
    if case == "missing_candidate":
        args[1] = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
        args[1] = str(tmp_path / "junk.onnx")
    elif case == "torch_reference":
        args[3] = str(tmp_path / "model.pt")
    elif case == "npz_wrong_key":
        np.savez(tmp_path / "k.npz", image=np.zeros((1, 3, 8, 8), np.float32))
        args += ["--inputs", str(tmp_path / "k.npz")]
    elif case == "npz_missing":
        args += ["--inputs", str(tmp_path / "missing.npz")]
    elif case == "dynamic_dims":
        onnx.save(three_layer(batch="N"), tmp_path / "dyn.onnx")
        args = ["parity", str(tmp_path / "dyn.onnx"), "-r", str(tmp_path / "dyn.onnx")]
    elif case == "zero_samples":
        args += ["--num-samples", "0"]
    elif case == "bad_max_lsb":
        args += ["--max-lsb", "-1"]
    elif case == "no_reference":
        args = ["parity", str(ref)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiexport: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_dynamic_dims_message_points_at_inputs(tmp_path, capsys) -> None:
    onnx.save(three_layer(batch="N"), tmp_path / "dyn.onnx")
    assert main(["parity", str(tmp_path / "dyn.onnx"), "-r", str(tmp_path / "dyn.onnx")]) == 2
    assert "--inputs" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_tty_and_erases_itself() -> None:
    stream = _Tty()
    with ProgressBar("parity", stream=stream) as bar:
        bar(1, 4)
        bar(4, 4)
    text = stream.getvalue()
    assert "1/4" in text and "4/4" in text and "[" in text
    assert text.endswith("\r")


def test_progress_bar_is_silent_off_a_tty() -> None:
    stream = io.StringIO()
    with ProgressBar("parity", stream=stream) as bar:
        bar(1, 4)
    assert stream.getvalue() == ""


def test_parity_between_onnx_models_never_imports_torch(models) -> None:
    ref, bad = models
    code = (
        "import sys\n"
        "from tiexport.cli import main\n"
        f"rc = main(['parity', {str(bad)!r}, '-r', {str(ref)!r}, '--per-layer', '-o', {str(ref.parent / 'r.txt')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "verdict: FAILED" in (ref.parent / "r.txt").read_text()
