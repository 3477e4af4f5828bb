"""The README's two commands: CI runs exactly the test command; the run command uses files that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block(tag: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {tag} -->\s*```bash\n(.*?)\n```\s*<!-- /{tag} -->", text, re.S)
    assert m, f"README has no {tag} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _block("test-command") in ci_lines


def test_commands_pin_the_cpu_torch_and_run_pytest() -> None:
    for tag in ("run-command", "test-command"):
        assert "torch==2.13.0" in _block(tag)
    assert "pytest" in _block("test-command")


def test_run_command_files_exist() -> None:
    for token in _block("run-command").split():
        if token.endswith(".onnx") or token.endswith(".py"):
            assert (ROOT / token).exists(), token


def test_end_to_end_example_runs(tmp_path: Path) -> None:
    """The README's main job, with fewer training epochs: every stage runs and both devices come out usable."""
    import sys

    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "end_to_end.py"), "--device", "AM68A", "--device", "TDA4VM",
         "--out", str(tmp_path), "--epochs", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("parity (ONNX Runtime vs PyTorch fake-quant): PASSED") == 2
    assert "validate: incompatible" not in res.stdout
    snippets = sorted(p.name for p in tmp_path.glob("*.benchmark.py"))
    assert snippets == ["smallcnn_wc8_at8_am68a.benchmark.py", "smallcnn_wt8symp2_at8symp2_tda4vm.benchmark.py"]
    assert "runtime_options_onnx_qat_v2_p2" in (tmp_path / snippets[1]).read_text()
