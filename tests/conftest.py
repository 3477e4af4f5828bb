"""Shared test setup: the repo root on sys.path (for ``fixtures``), fixture paths, and small helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "fixtures" / "models"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
