"""DowngradeIrVersionPass: the oldest IR version the opsets allow, when the model's is newer than TIDL reads."""

from __future__ import annotations

from fixtures.models import tiny_conv
from tests.passes.helpers import apply, assert_valid
from tiexport.passes.ir_version import DowngradeIrVersionPass
from tiexport.validators.validate import validate


def test_ir_10_with_opset_17_becomes_ir_8() -> None:
    model = tiny_conv()
    model.ir_version = 10
    out, (res,) = apply(model, DowngradeIrVersionPass())
    assert res.modified and res.changes == 1 and not res.numerics_changed
    assert out.ir_version == 8
    assert_valid(out)
    assert not any(f.rule_id == "TIDL003" for f in validate(out, "AM68A").findings)


def test_opset_19_needs_ir_9() -> None:
    model = tiny_conv(opset=19)
    model.ir_version = 11
    out, _ = apply(model, DowngradeIrVersionPass())
    assert out.ir_version == 9


def test_supported_ir_is_untouched() -> None:
    out, (res,) = apply(tiny_conv(), DowngradeIrVersionPass())
    assert not res.modified and out.ir_version == 8


def test_opset_that_needs_a_newer_ir_is_kept_with_a_note() -> None:
    model = tiny_conv(opset=21)
    model.ir_version = 10
    out, (res,) = apply(model, DowngradeIrVersionPass())
    assert not res.modified and out.ir_version == 10
    assert any("need IR 10" in n for n in res.notes)


def test_second_run_changes_nothing() -> None:
    model = tiny_conv()
    model.ir_version = 10
    _, (first, second) = apply(model, DowngradeIrVersionPass(), DowngradeIrVersionPass())
    assert first.modified and not second.modified
