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
    res = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
                       "| sed -n '/^```bash$/,/^```$/p' | sed '1d;$d'"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert res.stdout.strip() == _block("test-command")
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_commands_pin_the_cpu_torch_and_run_pytest() -> None:
    for tag in ("run-command", "test-command"):
        assert "torch==2.13.0" in _block(tag)
    assert "pytest" in _block("test-command")


def test_run_command_files_exist() -> None:
    for token in _block("run-command").split():
        if token.endswith(".onnx") or token.endswith(".py"):
            assert (ROOT / token).exists(), token
