"""Quantization quality: SQNR of the exported, fixed QDQ model's logits in ONNX Runtime against the float logits.

``python bench/quant_quality.py`` (under a minute on 2 cores; ``--quick`` only checks the script runs, in seconds).
Accuracy alone saturates on this task (every method lands within a test image or two of float), so the headline
figure is the SQNR in dB of the logits, with accuracy and top-1 agreement with the float model beside it.

Model and data: the repo's SmallCNN (``fixtures.torch_models``: conv/bn/relu, depthwise-separable block, residual
add, concat, max pooling + nearest resize, global average pooling, linear) with one input channel and width 16,
trained in float on scikit-learn's bundled 8x8 digits (1257 training, 540 test images, stratified, seed 0).
Calibration: the first 240 training images (4 batches of 60; TI recommends >= 100). Exported models have a static
batch of 60; the test set is 9 such batches. Every contender starts from the same trained float weights.

Contenders, all exported to QDQ ONNX, fixed with ``tiexport.fix`` for the device each targets (AM68A; TDA4VM for
``WT8SYMP2_AT8SYMP2``) and run in ONNX Runtime with graph optimizations off (as TI recommends for QDQ models):

- tiexport PTC, every qconfig type, defaults (2 calibration epochs, bias calibration 0.01, default range shrink);
- tiexport QAT, every qconfig type, 3 epochs over the training set (TI's default freezing: batch norm frozen from the
  start, observers after epoch 2), Adam lr 1e-5 (0.1 % of the float peak lr: TI's ~1 % diverged from the float
  logits here, measured 1e-4: -0.3 to -2.4 dB against 1e-5), loss = MSE to the float model's logits (distillation;
  the teacher logits are computed once up front, the wrapper keeps no float copy);
- ablations on WC8_AT8 and WT8SYMP2_AT8SYMP2 PTC: range shrink off / 0.01 / 0.1 / 0.25 %, per-batch ranges averaged
  instead of maxed, bias calibration off / 0.01 / 0.1;
- torch.ao's default FX PTQ: ``prepare_fx`` with ``get_default_qconfig_mapping("qnnpack")`` (HistogramObserver),
  calibrate, ``convert_fx``, exported with ``tiexport.export``;
- ONNX Runtime ``quantize_static`` on the float ONNX: QDQ, per-channel int8 weights, uint8 activations, MinMax and
  Percentile (99.999) calibration.

"torch SQNR" / "torch acc" are those of the PyTorch model itself (fake-quant for tiexport, the converted model for
torch.ao), to check that export keeps it (target: ONNX Runtime accuracy equal within 0.1 points).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import Check, Config, Section, script_main

__all__ = ["run"]

log = logging.getLogger("bench.quant_quality")

BATCH = 60
CALIB_BATCHES = 4
THREADS = 1
FLOAT_EPOCHS = 30
FLOAT_LR = 1e-2
QAT_EPOCHS = 3
QAT_LR = 1e-5
DEVICE_OF = {"WT8SYMP2_AT8SYMP2": "TDA4VM"}  # everything else: AM68A


@dataclass
class Data:
    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any

    def calibration(self) -> list[Any]:
        return [self.train_x[i * BATCH:(i + 1) * BATCH] for i in range(CALIB_BATCHES)]

    def test_batches(self) -> list[Any]:
        return [self.test_x[i:i + BATCH] for i in range(0, len(self.test_x), BATCH)]


@dataclass
class Row:
    group: str
    method: str
    device: str
    sqnr_db: float
    accuracy: float
    agreement: float
    torch_accuracy: float | None
    torch_sqnr_db: float | None
    parity: str
    verdict: str
    seconds: float


def _load_data(quick: bool) -> Data:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    tx, vx, ty, vy = train_test_split(x, y, test_size=540, stratify=y, random_state=0)
    if quick:
        tx, ty, vx, vy = tx[:300], ty[:300], vx[:120], vy[:120]
    return Data(torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(vx), torch.from_numpy(vy))


def _train_float(data: Data, epochs: int) -> Any:
    import torch

    from fixtures.torch_models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=FLOAT_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.train_x), generator=gen)
        for i in range(0, len(order) - 63, 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def _logits(fn: Callable[[Any], Any], batches: list[Any]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([np.asarray(fn(b).detach().cpu().numpy()) for b in batches])


def _ort_logits(path: Path, batches: list[Any]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b.numpy()})[0] for b in batches])


def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.sum((candidate.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


AGG_LABEL = {"max": "widest", "mean": "averaged"}


def other_of(qconfig_type: str) -> str:
    """The range aggregation a named type does not use by default (power-of-2 types average)."""
    from tiexport.quantization.qconfig import QCONFIG_TYPES

    return "max" if QCONFIG_TYPES[qconfig_type].activation_power_of_2 else "mean"


def agg_text(qconfig_type: str) -> str:
    return ("per-batch ranges averaged (default) vs widest" if other_of(qconfig_type) == "max"
            else "widest per-batch range (default) vs averaged")


def _fix(path: Path, device: str) -> tuple[str, Any]:
    from tiexport import fix
    from tiexport.validators.validate import validate

    _fixed, report = fix(str(path), device=device, output=path, protect=())
    return validate(str(path), device=device).devices[device].verdict, report


class Bench:
    def __init__(self, cfg: Config) -> None:
        import torch

        torch.set_num_threads(THREADS)
        self.cfg = cfg
        self.quick = cfg.quick
        self.work = cfg.work / "quant_quality"
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = _load_data(cfg.quick)
        t0 = time.perf_counter()
        self.float_model = _train_float(self.data, 3 if cfg.quick else FLOAT_EPOCHS)
        log.info("float model trained in %.1f s", time.perf_counter() - t0)
        self.tests = self.data.test_batches()
        self.float_test = _logits(self.float_model, self.tests)
        self.float_pred = self.float_test.argmax(1)
        self.labels = self.data.test_y.numpy()
        self.float_acc = 100.0 * float((self.float_pred == self.labels).mean())
        self.train_batches = [self.data.train_x[i:i + BATCH] for i in range(0, len(self.data.train_x) - BATCH + 1,
                                                                              BATCH)]
        self.teacher = [_logits(self.float_model, [b]) for b in self.train_batches]
        self.rows: list[Row] = []

    def _row(self, group: str, method: str, device: str, onnx_logits: np.ndarray, torch_logits: np.ndarray | None,
             parity: str, verdict: str, seconds: float) -> Row:
        pred = onnx_logits.argmax(1)
        torch_acc = None if torch_logits is None else 100.0 * float((torch_logits.argmax(1) == self.labels).mean())
        torch_sqnr = None if torch_logits is None else _sqnr_db(self.float_test, torch_logits)
        row = Row(group, method, device, _sqnr_db(self.float_test, onnx_logits),
                  100.0 * float((pred == self.labels).mean()), 100.0 * float((pred == self.float_pred).mean()),
                  torch_acc, torch_sqnr, parity, verdict, seconds)
        log.info("%-45s %6.2f dB  acc %.2f  agree %.2f  (%.1f s)", method, row.sqnr_db, row.accuracy,
                 row.agreement, seconds)
        self.rows.append(row)
        return row

    # --- tiexport ----------------------------------------------------------------------------------------------
    def ours(self, group: str, qconfig_type: str, mode: str, label: str | None = None, *,
             range_shrink_percentile: float | None = None, aggregation: str | None = None,
             bias_calibration_factor: float | None = None, equalize: bool | None = None) -> Row:
        import torch

        from tiexport.quantization.observers import ActivationObserver
        from tiexport.wrappers import PTCFxModule, QATFxModule

        t0 = time.perf_counter()
        model = copy.deepcopy(self.float_model)  # the benchmark keeps its float model; the wrapper copies nothing
        calib = self.data.calibration()
        if mode == "PTC":
            kwargs: dict[str, Any] = {"range_shrink_percentile": range_shrink_percentile,
                                      "cross_layer_equalization": equalize}
            if bias_calibration_factor is not None:
                kwargs["bias_calibration_factor"] = bias_calibration_factor
            w: Any = PTCFxModule(model, qconfig_type=qconfig_type, example_inputs=calib[0], **kwargs)
        else:
            w = QATFxModule(model, total_epochs=QAT_EPOCHS, qconfig_type=qconfig_type, example_inputs=calib[0],
                            cross_layer_equalization=equalize)
        if aggregation is not None:
            for m in w.module.modules():
                if isinstance(m, ActivationObserver) and m.range_shrink_percentile > 0:
                    m.range_aggregation = aggregation
        if mode == "PTC":
            for _ in range(w.total_epochs):
                w.train()
                for x in calib:
                    w(x)
        else:
            opt = torch.optim.Adam(w.parameters(), lr=QAT_LR)
            for _ in range(1 if self.quick else QAT_EPOCHS):
                w.train()
                for x, teacher in zip(self.train_batches, self.teacher, strict=True):
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(w(x), torch.from_numpy(teacher)).backward()
                    opt.step()
        w.eval()
        torch_logits = _logits(w, self.tests)
        device = DEVICE_OF.get(qconfig_type, "AM68A")
        name = (label or f"{qconfig_type}_{mode}").replace(" ", "_").replace("%", "pct").replace("/", "_")
        result = w.export(self.tests[0], self.work / f"{name}.onnx", device=device)
        onnx_logits = _ort_logits(result.path, self.tests)
        parity = "pass" if result.parity_passed else "FAIL"
        verdict = result.validation.devices[device].verdict
        return self._row(group, label or f"tiexport {mode} {qconfig_type}", device, onnx_logits, torch_logits,
                         parity, verdict, time.perf_counter() - t0)

    # --- peers -------------------------------------------------------------------------------------------------
    def torch_ao_ptq(self) -> Row:
        import torch
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        from tiexport import export

        t0 = time.perf_counter()
        torch.backends.quantized.engine = "qnnpack"
        model = copy.deepcopy(self.float_model).eval()
        calib = self.data.calibration()
        prepared = prepare_fx(model, get_default_qconfig_mapping("qnnpack"), (calib[0],))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        converted = convert_fx(prepared)
        torch_logits = _logits(converted, self.tests)
        path = self.work / "torch_ao_default_ptq.onnx"
        export(converted, self.tests[0], path)
        verdict, _ = _fix(path, "AM68A")
        return self._row("peer", "torch.ao default FX PTQ (qnnpack)", "AM68A", _ort_logits(path, self.tests),
                         torch_logits, "-", verdict, time.perf_counter() - t0)

    def ort_static(self, method: str) -> Row:
        import torch
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        t0 = time.perf_counter()
        float_path = self.work / "float.onnx"
        if not float_path.exists():
            with torch.no_grad():
                torch.onnx.export(self.float_model, (self.tests[0],), str(float_path), input_names=["input"],
                                  output_names=["logits"], opset_version=17, dynamo=False)
        calib = [{"input": x.numpy()} for x in self.data.calibration()]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(calib)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

        path = self.work / f"ort_{method.lower()}.onnx"
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
        verdict, _ = _fix(path, "AM68A")
        return self._row("peer", f"ORT quantize_static per-channel {method}", "AM68A",
                         _ort_logits(path, self.tests), None, "-", verdict, time.perf_counter() - t0)


def _table(rows: list[Row]) -> list[str]:
    out = ["| group | method | fixed for | **SQNR dB** | ORT acc % | top-1 agree % | torch SQNR dB | torch acc % "
           "| parity | verdict | s |",
           "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        torch_acc = "-" if r.torch_accuracy is None else f"{r.torch_accuracy:.2f}"
        torch_sqnr = "-" if r.torch_sqnr_db is None else f"{r.torch_sqnr_db:.2f}"
        out.append(f"| {r.group} | {r.method} | {r.device} | **{r.sqnr_db:.2f}** | {r.accuracy:.2f} | "
                   f"{r.agreement:.2f} | {torch_sqnr} | {torch_acc} | {r.parity} | {r.verdict} | {r.seconds:.1f} |")
    return out


def _check(metric: str, value: float, limit: float, unit: str = " dB") -> Check:
    ok = value >= limit
    margin = f"{value - limit:+.2f}{unit}"
    return Check(metric, value, f">= {limit:.3g}{unit}", ok, margin)


def run(cfg: Config) -> list[Section]:
    from tiexport.quantization.qconfig import QCONFIG_TYPES

    # torch.ao, TorchScript export and quantized-tensor creation all announce their deprecation on every call
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*(deprecated|quantize_per_tensor).*", category=UserWarning)

    section = Section("quant_quality", "Quantization quality: digits CNN, exported + fixed QDQ in ONNX Runtime",
                      "python bench/quant_quality.py" + (" --quick" if cfg.quick else ""))
    t_start = time.perf_counter()
    bench = Bench(cfg)
    types = list(QCONFIG_TYPES) if not cfg.quick else ["WC8_AT8"]
    ptc = {t: bench.ours("PTC", t, "PTC") for t in types}
    qat = {t: bench.ours("QAT", t, "QAT") for t in types}
    ablation_types = [] if cfg.quick else ["WC8_AT8", "WT8SYMP2_AT8SYMP2"]
    for t in ablation_types:
        for p in (0.0, 0.1, 0.25):
            bench.ours("ablation", t, "PTC", f"{t} PTC, range shrink {p} %", range_shrink_percentile=p)
        # the aggregation the type does not use by default (power-of-2 types average per-batch ranges)
        other_agg = other_of(t)
        for mode in ("PTC", "QAT"):
            bench.ours("ablation", t, mode, f"{t} {mode}, per-batch ranges {AGG_LABEL[other_agg]}",
                       aggregation=other_agg)
        for f in (0.0, 0.1):
            bench.ours("ablation", t, "PTC", f"{t} PTC, bias calibration {f}", bias_calibration_factor=f)
        bench.ours("ablation", t, "PTC", f"{t} PTC, no range shrink, no bias calibration",
                   range_shrink_percentile=0.0, bias_calibration_factor=0.0)
        equalized = t == "WT8SYMP2_AT8SYMP2"  # the default for the per-tensor type; off for the others
        for mode in ("PTC", "QAT"):
            bench.ours("ablation", t, mode, f"{t} {mode}, cross-layer equalization {'off' if equalized else 'on'}",
                       equalize=not equalized)
    peers: dict[str, Row] = {}
    if cfg.peers:
        peers["torch.ao"] = bench.torch_ao_ptq()
        for method in ("MinMax", "Percentile"):
            peers[method] = bench.ort_static(method)

    section.body = [
        f"Float model: {bench.float_acc:.2f} % test accuracy ({len(bench.labels)} test images, "
        f"{len(bench.data.train_x)} training images). SQNR: 10 log10(sum f^2 / sum (q - f)^2) over all test logits, "
        "q from the exported and fixed model in ONNX Runtime (graph optimizations off), f from the float model. "
        "Parity: the fixed ONNX against the PyTorch module (within 1 LSB on >= 99.9 % of outputs).",
        "",
        *_table(bench.rows),
    ]
    by_method = {r.method: r for r in bench.rows}
    attribution = []
    for t in ablation_types:
        base = ptc[t].sqnr_db

        def delta(label: str, t: str = t, base: float = base) -> str:
            return f"{base - by_method[f'{t} PTC, {label}'].sqnr_db:+.2f} dB"

        attribution.append(
            f"- {t} PTC ({base:.2f} dB with defaults): range shrink 0.01 % vs none {delta('range shrink 0.0 %')}, "
            f"vs TI v3's default 0.1 % {delta('range shrink 0.1 %')}; {agg_text(t)} "
            f"{delta('per-batch ranges ' + AGG_LABEL[other_of(t)])}; bias calibration 0.01 vs none "
            f"{delta('bias calibration 0.0')}, "
            f"vs 0.1 {delta('bias calibration 0.1')}; both optimisations vs neither "
            f"{delta('no range shrink, no bias calibration')}; cross-layer equalization "
            + (f"on (default) vs off {delta('cross-layer equalization off')}"
               if t == "WT8SYMP2_AT8SYMP2" else f"off (default) vs on {delta('cross-layer equalization on')}")
            + "."
        )
        qat_agg = by_method.get(f"{t} QAT, per-batch ranges {AGG_LABEL[other_of(t)]}")
        if t in qat and qat_agg is not None:
            attribution.append(f"- {t} QAT ({qat[t].sqnr_db:.2f} dB with defaults): {agg_text(t)} "
                               f"{qat[t].sqnr_db - qat_agg.sqnr_db:+.2f} dB.")
        cle = "off" if t == "WT8SYMP2_AT8SYMP2" else "on"
        qat_alt = by_method.get(f"{t} QAT, cross-layer equalization {cle}")
        if t in qat and qat_alt is not None:
            attribution.append(f"- {t} QAT ({qat[t].sqnr_db:.2f} dB with defaults): cross-layer equalization "
                               f"{'on vs off' if cle == 'off' else 'off vs on'} "
                               f"{qat[t].sqnr_db - qat_alt.sqnr_db:+.2f} dB.")
    if qat:
        gains = [qat[t].sqnr_db - ptc[t].sqnr_db for t in types]
        attribution.append(f"- QAT ({QAT_EPOCHS} epochs, distillation) over PTC: {min(gains):+.2f} to "
                           f"{max(gains):+.2f} dB across the {len(types)} types.")
    if attribution:
        section.body += ["", "What each optimisation buys (positive: the default is better by that much):", "",
                         *attribution]
    if "WC8_AT8" in ptc and peers:
        best_ort = max((r for k, r in peers.items() if k != "torch.ao"), key=lambda r: r.sqnr_db)
        section.checks.append(_check("WC8_AT8 PTC SQNR vs best ONNX Runtime quantize_static", ptc["WC8_AT8"].sqnr_db,
                                     best_ort.sqnr_db))
        for t, r in ptc.items():
            if QCONFIG_TYPES[t].activation_power_of_2:
                section.checks.append(_check(f"{t} PTC SQNR vs torch.ao default PTQ", r.sqnr_db,
                                             peers["torch.ao"].sqnr_db))
    for t in types:
        section.checks.append(_check(f"{t} QAT SQNR vs PTC", qat[t].sqnr_db, ptc[t].sqnr_db))
    gaps = [abs(r.accuracy - r.torch_accuracy) for r in bench.rows
            if r.torch_accuracy is not None and r.group != "peer"]
    if gaps:
        worst = max(gaps)
        section.checks.append(Check("tiexport: max abs(ORT acc - torch acc), points", worst, "<= 0.1 points",
                                    worst <= 0.1, f"{worst - 0.1:+.2f} points"))
    tda4vm = [r for r in bench.rows if r.device == "TDA4VM"]
    am68a = [r for r in bench.rows if r.device == "AM68A" and r.torch_accuracy is not None and r.group != "peer"]
    if tda4vm:
        section.notes.append(
            "TDA4VM rows: `fix --device TDA4VM` keeps the float bias (TIDL quantizes it itself; the device profile "
            "no longer asks fix to, which had moved outputs by 1-2 steps against the torch model); parity FAIL in "
            f"{sum(r.parity != 'pass' for r in tda4vm)} of {len(tda4vm)} TDA4VM rows, ORT accuracy vs torch up to "
            f"{max(abs(r.accuracy - (r.torch_accuracy or r.accuracy)) for r in tda4vm):.2f} points. "
            f"AM68A rows: parity {'pass' if all(r.parity == 'pass' for r in am68a) else 'not all pass'}, "
            f"largest accuracy gap {max((abs(r.accuracy - (r.torch_accuracy or 0)) for r in am68a), default=0):.2f}.")
    if "WT8SYMP2_AT8SYMP2" in ptc and peers:
        section.notes.append(
            "WT8SYMP2_AT8SYMP2 is TDA4VM's constrained scheme: per-tensor power-of-2 weights and symmetric power-of-2 "
            "activations, against torch.ao's per-tensor weights with free scales and affine histogram ranges. "
            "Cross-layer equalization (default for this type) evens the channels of stem->depthwise->pointwise and "
            "fuse->fc and puts each pair's first layer on the power-of-2 weight grid; QAT keeps 5 % headroom below "
            "the grid because its weights move (measured: 33.9 dB without headroom, 34.8 with). Tried and not "
            "adopted: choosing the weight power of two by quantization MSE instead of the ceiling (-0.45 dB), taking "
            "the lower power of two for activation ranges within one step of it (+0.04 dB for this type, -0.3 dB "
            "for the other power-of-2 types), bias calibration during QAT (0.01: -0.1 dB, 0.001: +0.1 dB; measured "
            "with the widest-range aggregation).")
    section.notes.append(f"total wall time {time.perf_counter() - t_start:.0f} s, torch and ORT on {THREADS} thread")
    if not cfg.peers:
        section.notes.append("peers skipped (--no-peers or --quick)")
    section.status = "ok"
    return [section.finish()]


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
