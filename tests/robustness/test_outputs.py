"""Issue 18, round two: where reports and models are written (never the input's weights, never over a FIFO, device
or symlink, the mode of an existing file kept, write errors in one line, SIGTERM leaves no temp file), what reaches
the terminal (control characters from the model escaped), and external-data fields ONNX Runtime would refuse."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from fixtures.models import tiny_conv
from tiexport.cli import main
from tiexport.errors import UnusableInputError, UsageError
from tiexport.onnx_io import check_output, load_model, save_model


def _external(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    return path


# ------------------------------------------------------------------------------------------------ 1. input weights
@pytest.mark.parametrize("argv", [
    ["validate", "{m}", "-o", "{d}"],
    ["snippet", "{m}", "-d", "AM68A", "-o", "{d}"],
    ["fix", "{m}", "-d", "AM68A", "-o", "{d}", "--no-parity"],
    ["parity", "{m}", "-r", "{m}", "-o", "{d}"],
], ids=["validate", "snippet", "fix", "parity"])
def test_output_onto_the_inputs_external_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         argv: list[str]) -> None:
    model = _external(tmp_path)
    data = tmp_path / "m.onnx.data"
    before = data.read_bytes()
    assert main([a.format(m=model, d=data) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "external data of the input model" in err and err.count("\n") == 1
    assert data.read_bytes() == before
    load_model(model, load_external_data=True)  # still loads


# ------------------------------------------------------------------------------------------------ 2. not a file
def test_output_that_is_a_fifo_or_a_symlink_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(model))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "target.txt"
    target.write_text("keep")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert main(["validate", str(model), "-o", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err and stat.S_ISFIFO(fifo.stat().st_mode)
    assert main(["fix", str(model), "-d", "AM68A", "-o", str(link), "--no-parity"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink() and target.read_text() == "keep"
    with pytest.raises(UsageError, match="not a regular file"):
        check_output("/dev/null")


# ------------------------------------------------------------------------------------------------ 3. modes
def test_an_existing_output_keeps_its_mode(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(model))
    out = tmp_path / "report.txt"
    out.write_text("old")
    out.chmod(0o600)
    assert main(["validate", str(model), "-d", "AM68A", "-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and "AM68A" in out.read_text()
    model.chmod(0o444)
    assert main(["fix", str(model), "-d", "AM68A", "--in-place", "--no-parity"]) == 0
    assert stat.S_IMODE(model.stat().st_mode) == 0o444


def test_a_new_output_gets_the_umask_mode(tmp_path: Path) -> None:
    save_model(tiny_conv(), tmp_path / "new.onnx")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "new.onnx").stat().st_mode) == 0o666 & ~mask


# ------------------------------------------------------------------------------------------------ 9. write errors
def test_a_read_only_folder_is_one_line_not_an_internal_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    model = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(model))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["validate", str(model), "-o", str(folder / "r.txt")]) == 2
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith("tiexport: error: cannot write") and "internal error" not in err


def test_disk_full_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import tiexport.onnx_io as io

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    model = tmp_path / "m.onnx"
    onnx.save(tiny_conv(), str(model))
    monkeypatch.setattr(io.os, "replace", full)
    assert main(["validate", str(model), "-o", str(tmp_path / "r.txt")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left


# ------------------------------------------------------------------------------------------------ 9, 11. ext. data
@pytest.mark.parametrize("key, value", [("offset", "abc"), ("length", "1e3"), ("offset", "-8"), ("length", "-1")])
def test_external_data_fields_onnx_runtime_refuses_are_unusable_input(tmp_path: Path, key: str, value: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = _external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path))
    with pytest.raises(UnusableInputError, match="non-negative integer"):
        load_model(path)
    assert main(["validate", str(path)]) == 2
    assert "internal error" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 4. terminal
def test_control_characters_from_the_model_are_escaped_in_text_output(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_conv(w_zp=2)  # an error finding that names the weight's DequantizeLinear
    evil = "\x1b]0;pwned\x07\x1b[2J\u202e"
    for node in model.graph.node:
        node.name = node.name + evil
    model.producer_name = "x" + evil
    path = tmp_path / "evil.onnx"
    onnx.save(model, str(path))
    main(["validate", str(path), "-d", "AM68A"])
    main(["info", str(path)])
    main(["snippet", str(path), "-d", "AM68A"])  # refused: findings on stderr
    out, err = capsys.readouterr()
    for text in (out, err):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out and "\\x1b" in err


# ------------------------------------------------------------------------------------------------ 13. SIGTERM
def test_sigterm_during_a_write_leaves_no_temp_file(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "import tiexport.onnx_io as io\n"
        "from tiexport.cli import main\n"
        "real = io.os.replace\n"
        "def slow(a, b):\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(30)\n"
        "    real(a, b)\n"
        "io.os.replace = slow\n"
        f"sys.exit(main(['validate', {str(tmp_path / 'm.onnx')!r}, '-o', {str(tmp_path / 'r.txt')!r}]))\n"
    )
    onnx.save(tiny_conv(), str(tmp_path / "m.onnx"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_main_restores_the_sigterm_handler(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    onnx.save(tiny_conv(), str(tmp_path / "m.onnx"))
    main(["validate", str(tmp_path / "m.onnx"), "-d", "AM68A"])
    assert signal.getsignal(signal.SIGTERM) == before
