"""The public API: every name in ``tiexport.__all__`` resolves, and the ONNX-side names do so without torch."""

from __future__ import annotations

import subprocess
import sys

import tiexport

TORCH_SIDE = {"export", "ExportResult", "ExportError", "PTCFxModule", "QATFxModule", "load_weights", "PTQPT2EModule",
              "QATPT2EModule", "TIDLQuantizer"}


def test_every_public_name_resolves() -> None:
    missing = [name for name in tiexport.__all__ if getattr(tiexport, name, None) is None]
    assert missing == []


def test_onnx_side_api_does_not_import_torch() -> None:
    names = [n for n in tiexport.__all__ if n not in TORCH_SIDE and n != "__version__"]
    code = (
        "import sys, tiexport\n"
        f"for n in {names!r}: getattr(tiexport, n)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
