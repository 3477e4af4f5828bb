"""The committed fixtures are what fixtures/make_fixtures.py makes (hand-built graphs byte for byte), and every
committed model loads and passes the ONNX checker unless it is a deliberately broken one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "models"


def test_hand_built_fixtures_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_fixtures.py"), "--no-torch", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    regenerated = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert regenerated, "make_fixtures wrote nothing"
    stale = [n for n in regenerated if not (FIXTURES / n).exists()
             or (FIXTURES / n).read_bytes() != (tmp_path / n).read_bytes()]
    assert stale == [], f"run fixtures/make_fixtures.py: stale or missing {stale}"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.onnx")), ids=lambda p: p.stem)
def test_fixture_loads(path: Path) -> None:
    model = onnx.load(str(path))
    if path.stem.startswith("TIDL001"):
        return  # structurally broken on purpose
    onnx.checker.check_model(model)
