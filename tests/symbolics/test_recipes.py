"""The two plain-PyTorch recipes users copy from the tech report, end to end: quantize, export with each exporter,
validate for AM68A (no error findings) and check parity against the PyTorch model.

- FX PTQ: ``prepare_fx(model, {"": get_default_qconfig(backend)})``, calibrate, ``convert_fx``.
- Eager QAT: QuantStub/DeQuantStub model, ``fuse_modules``, ``prepare_qat``, a few training steps, ``convert``.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

import tiexport  # noqa: E402
from fixtures.torch_models import EagerQATNet, calibration_batches  # noqa: E402
from tests.symbolics.helpers import CNN_SHAPE, float_model, parity_fraction, quiet  # noqa: E402

EAGER_SHAPE = (1, 3, 16, 16)
_BUILT: dict[str, torch.nn.Module] = {}


def _fx_ptq(backend: str = "x86") -> torch.nn.Module:
    if "fx_ptq" not in _BUILT:
        from torch.ao.quantization import get_default_qconfig
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with quiet(), torch.no_grad():
            prepared = prepare_fx(float_model("cnn"), {"": get_default_qconfig(backend)}, (torch.rand(CNN_SHAPE),))
            for batch in calibration_batches(CNN_SHAPE, 2, seed=3):
                prepared(batch)
            _BUILT["fx_ptq"] = convert_fx(prepared)
    return _BUILT["fx_ptq"]


def _eager_qat(backend: str = "x86", steps: int = 3) -> torch.nn.Module:
    if "eager_qat" not in _BUILT:
        import torch.ao.quantization as tq

        torch.manual_seed(0)
        with quiet():
            model = EagerQATNet().eval()
            model = tq.fuse_modules(model, EagerQATNet.fuse_names())
            model.train()
            model.qconfig = tq.get_default_qat_qconfig(backend)
            tq.prepare_qat(model, inplace=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for i, batch in enumerate(calibration_batches((4, *EAGER_SHAPE[1:]), steps, seed=5)):
                target = torch.full((4,), i % 10)
                loss = torch.nn.functional.cross_entropy(model(batch), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            _BUILT["eager_qat"] = tq.convert(model)
    return _BUILT["eager_qat"]


RECIPES = {"fx_ptq": (_fx_ptq, CNN_SHAPE), "eager_qat": (_eager_qat, EAGER_SHAPE)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each recipe exported once per exporter (shared by the validate and parity tests)."""
    out = {}
    folder = tmp_path_factory.mktemp("recipes")
    for recipe, (build, shape) in RECIPES.items():
        for exporter in ("torchscript", "dynamo"):
            path = folder / f"{recipe}_{exporter}.onnx"
            tiexport.export(build(), torch.rand(shape), path, exporter=exporter)
            out[recipe, exporter] = path
    return out


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_export_has_no_error_finding_on_am68a(exported, recipe, exporter):
    report = tiexport.validate(exported[recipe, exporter], "AM68A")
    errors = [f"{f.rule_id} {f.node}: {f.message}" for f in report.devices["AM68A"].findings if f.severity == "error"]
    assert errors == []


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_export_matches_torch_within_one_step(exported, recipe, exporter):
    build, shape = RECIPES[recipe]
    assert parity_fraction(build(), exported[recipe, exporter], shape, n=3) >= 0.999


@pytest.mark.skipif(importlib.util.find_spec("tiexport.parity") is None,
                    reason="tiexport.parity is not built yet")
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_export_passes_the_parity_checker(exported, recipe):
    from tiexport.parity import check_parity

    build, shape = RECIPES[recipe]
    inputs = [b.numpy() for b in calibration_batches(shape, 2, seed=9)]
    report = check_parity(build(), str(exported[recipe, "dynamo"]), inputs=inputs)
    assert report.passed, report
