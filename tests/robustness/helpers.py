"""Helpers the robustness tests share: run the CLI in-process, hash files, check one-line errors and loadable
models (onnx.checker plus an ONNX Runtime session, the promise ``fix`` makes about what it writes)."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import onnx
import onnxruntime as ort

from tiexport.cli import main

__all__ = ["assert_loadable", "assert_one_line", "cli", "digest", "folder_digest"]


def cli(*argv: str) -> tuple[int, str, str]:
    """``tiexport ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def folder_digest(folder: Path) -> dict[str, str | None]:
    """Every file under ``folder`` (the model and its side files) by relative path -> sha256."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line(err: str, fragment: str | None = None) -> None:
    """The CLI's contract for exit 2: exactly one line on stderr, ``tiexport: error: ...``, no traceback."""
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert err.startswith("tiexport: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    if fragment is not None:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def assert_loadable(model: onnx.ModelProto | Path) -> None:
    """Passes the full onnx.checker and opens in ONNX Runtime (graph optimizations off, as TI recommends)."""
    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
