"""The conformance corpus (fixtures/conformance, built by fixtures/make_conformance.py from TI's own toolkit, TI's
model optimizer and ONNX Runtime's quantizer): the verdict tiexport gives each model on each device, with the TI
evidence for it, and what ``fix`` does to models that already meet the device.

Each expectation names the warning rules a group of models must get on a device (``required``) and the ones it may
get (``allowed``: TIDL033, whose 16-bit bias check depends on the trained values of each architecture). Errors are
never expected: every kind of model here is one TI deploys (the evidence column), so an error is a false positive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import tiexport
from tiexport.devices import DEVICES
from tiexport.tidl_spec import sources as src
from tiexport.workflows.fix import fix

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fixtures" / "conformance"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
MODELS: list[dict[str, Any]] = MANIFEST["models"]
MMAV2 = [name for name, p in DEVICES.items() if p.accelerator and p.mma_version == 2]


def _cl6508(device: str) -> str:
    """TI's model zoo ships artifacts of cl-6508 (mobilenet_v2_lite QAT v2 wc8-at8: per-channel, affine) for it."""
    return src.DocRef(src.TENSORLAB_REPO, "r11.0", f"edgeai-modelzoo/modelartifacts/{device}/8bits/artifacts.csv",
                      28).cite()


def _cl6098(device: str) -> str:
    """TI's model zoo ships artifacts of cl-6098 (mobilenet_v2 QAT v1 "qat-p2": Clip ranges) for it."""
    return src.DocRef(src.TENSORLAB_REPO, "r11.0", f"edgeai-modelzoo/modelartifacts/{device}/8bits/artifacts.csv",
                      17).cite()


@dataclass(frozen=True)
class Expect:
    """No errors; the warning rule ids ``required <= warned <= required | allowed``; the TI evidence for that."""

    required: frozenset[str] = frozenset()
    allowed: frozenset[str] = frozenset()
    evidence: tuple[str, ...] = ()


def _w(*ids: str) -> frozenset[str]:
    return frozenset(ids)


BIAS16 = _w("TIDL033")  # TDA4VM keeps biases in 16 bits (src.BENCHMARK_BIAS_16BIT): depends on the trained values


def group(entry: dict[str, Any]) -> str:
    if entry["producer"] == "onnxruntime.quantize_static":
        s = entry["ort_settings"]
        return f"ort_{'pc' if s['per_channel'] else 'pt'}_{'sym' if s['ActivationSymmetric'] else 'asym'}"
    if entry["producer"] == "ti_torchmodelopt_v1_qat":
        return "ti_v1"
    return f"ti_v2_{entry['qconfig_type']}"  # TI's export, and the same through TI's model optimizer


def expected(entry: dict[str, Any], device: str) -> Expect:
    g = group(entry)
    if device == "AM62":
        # no accelerator: everything runs in ONNX Runtime on Arm (edgeai-benchmark's preset: tidl_offload off)
        return Expect(evidence=(src.BENCHMARK_PRESETS,))
    if g == "ti_v1":
        # TI's QAT v1 format: recognized (info), compiled with runtime_options_onnx_qat_v1 on every device
        zoo = (_cl6098(device),) if device != "AM62A" else ()
        return Expect(evidence=(src.QAT_V1_DOC, src.BENCHMARK_QAT_V1_CONFIG, *zoo))
    if device in MMAV2:
        # asymmetric, per-channel QDQ is supported on every device but TDA4VM (src.DEVICE_FEATURES,
        # src.QUANT_ASYMMETRIC); TI deploys its own QAT v2 exports there (cl-6508); ORT's quantizer is the QDQ
        # producer TI's quantization doc points at for the definitions (tidl_fsg_quantization.md L48)
        zoo = (_cl6508(device),) if device != "AM62A" else ()
        return Expect(evidence=(src.DEVICE_FEATURES, src.QUANT_PREQUANTIZED_QDQ, *zoo))
    assert device == "TDA4VM"
    # TDA4VM: per-tensor power-of-2 symmetric is its native grid (src.TDA4VM_P2_TORCHMODELOPT); anything else is
    # imported on TIDL's own grid (TI deploys the per-channel affine cl-6508 there): warnings, never errors
    tda = (src.TDA4VM_P2_TORCHMODELOPT, src.QUANT_ASYMMETRIC, src.DEVICE_FEATURES, _cl6508("TDA4VM"))
    table = {
        # TI's TDA4VM qconfig: uint8 zero point 127 is TI's symmetric convention (info, not TIDL021)
        "ti_v2_WT8SYMP2_AT8SYMP2": _w(),
        "ti_v2_WC8SYMP2_AT8SYMP2": _w("TIDL022"),
        "ti_v2_WC8P2_AT8P2": _w("TIDL021", "TIDL022"),
        "ti_v2_MSA_WC8P2_AT8P2": _w("TIDL021", "TIDL022"),
        "ti_v2_WC8_AT8": _w("TIDL020", "TIDL021", "TIDL022"),
        "ti_v2_MSA_WC8_AT8": _w("TIDL020", "TIDL021", "TIDL022"),
        "ort_pc_asym": _w("TIDL020", "TIDL021", "TIDL022"),
        "ort_pc_sym": _w("TIDL020", "TIDL022"),
        "ort_pt_asym": _w("TIDL020", "TIDL021"),
        "ort_pt_sym": _w("TIDL020"),
    }
    return Expect(table[g], BIAS16, tda)


def _id(entry: dict[str, Any]) -> str:
    return entry["path"].split("conformance/")[1]


def test_corpus_covers_what_the_issue_asks() -> None:
    producers = {e["producer"] for e in MODELS}
    assert producers == {"ti_torchmodelopt_v2", "ti_torchmodelopt_v2+tidl_onnx_model_optimizer",
                         "ti_torchmodelopt_v1_qat", "onnxruntime.quantize_static"}
    ti = [e for e in MODELS if e["producer"] == "ti_torchmodelopt_v2"]
    assert {e["qconfig_type"] for e in ti} == {"WC8_AT8", "MSA_WC8_AT8", "WT8SYMP2_AT8SYMP2", "WC8SYMP2_AT8SYMP2",
                                                "WC8P2_AT8P2", "MSA_WC8P2_AT8P2"}
    assert {e["mode"] for e in ti} == {"ptc", "qat"} and len({e["architecture"] for e in ti}) >= 3
    settings = {(s["per_channel"], s["ActivationSymmetric"], s["quant_pre_process"])
                for s in (e["ort_settings"] for e in MODELS if e["producer"] == "onnxruntime.quantize_static")}
    assert len(settings) == 8
    ops = set()
    for e in MODELS:
        ops |= {n.op_type for n in onnx.load(str(ROOT / e["path"])).graph.node}
    assert {"Add", "Concat", "Resize", "MaxPool", "GlobalAveragePool", "Gemm", "Clip"} <= ops


@pytest.mark.parametrize("entry", MODELS, ids=_id)
def test_verdicts_match_ti(entry: dict[str, Any]) -> None:
    report = tiexport.validate(str(ROOT / entry["path"]), "all")
    for device, dev_report in report.devices.items():
        exp = expected(entry, device)
        assert exp.evidence, (device, "every expectation names its TI evidence")
        errors = [f"{f.rule_id}: {f.message}" for f in dev_report.findings if f.severity == "error"]
        warned = {f.rule_id for f in dev_report.findings if f.severity == "warning"}
        assert errors == [], device
        assert exp.required <= warned <= exp.required | exp.allowed, (device, sorted(warned))
        assert dev_report.verdict == ("compatible_with_warnings" if warned else "compatible"), device
        # every finding says what it rests on: a TI source, or that it is tiexport advice
        assert all(f.source or f.advice for f in dev_report.findings), device


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    model = onnx.load(str(ROOT / entry["path"]), load_external_data=False)
    return {model.graph.input[0].name: np.load(ROOT / entry["npz"])["input"]}


@pytest.mark.parametrize("entry", MODELS, ids=_id)
def test_fix_keeps_a_compliant_model_bit_identical(entry: dict[str, Any]) -> None:
    """Every corpus model meets the MMAv2 devices as it is: fix may rewrite hygiene, never the numerics."""
    feeds = _feeds(entry)
    before = _run(str(ROOT / entry["path"]), feeds)
    for device in MMAV2:
        fixed, report = fix(str(ROOT / entry["path"]), device, parity=False)
        after = _run(fixed, feeds)
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), device
        assert not report.numerics_changed, (device, [p.name for p in report.passes if p.numerics_changed])


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name (TI's exports keep their weights in Constant nodes)."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant"})
    return consts


def _output_scale(model: onnx.ModelProto) -> float:
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = _consts(model)
    node = producers[model.graph.output[0].name]
    while node.op_type != "DequantizeLinear":
        node = producers[node.input[0]]
    return float(consts[node.input[1]].ravel()[0])


def _scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = _consts(model)
    return {n.name: np.asarray(consts[n.input[1]], np.float32).ravel() for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")}


ZP127 = [e for e in MODELS if e.get("qconfig_type") == "WT8SYMP2_AT8SYMP2"]


@pytest.mark.parametrize("entry", ZP127, ids=_id)
def test_fix_of_ti_zero_point_127_export_for_tda4vm_moves_only_zero_points(entry: dict[str, Any]) -> None:
    """TI's TDA4VM qconfig writes uint8 zero point 127; fix for TDA4VM writes int8 zero point 0 on the same scales:
    every scale kept, the outputs within one step of TI's own (the export run in ONNX Runtime)."""
    original = onnx.load(str(ROOT / entry["path"]))
    fixed, report = fix(original, "TDA4VM", parity=False)
    before, after = _scales(original), _scales(fixed)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert {p.name for p in report.passes if p.changes and p.numerics_changed} == {"EnforceSymmetricPass"}
    out = _run(fixed, _feeds(entry))[0]
    ti = np.load(ROOT / entry["npz"])["ort_output"]
    assert np.max(np.abs(out - ti)) <= _output_scale(original) * (1 + 1e-6)
    left = {f.rule_id for f in tiexport.validate(fixed, "TDA4VM").findings if f.severity != "info"}
    assert left <= BIAS16
