"""The PT2E path beside the FX path: quantization quality per qconfig type and the cost of a QAT step.

``python bench/bench_pt2e.py`` (a few minutes on 2 cores; ``--quick``: WC8_AT8 only, one QAT epoch).

Quality: the setting of ``bench/quant_quality.py`` (digits CNN, same float weights, calibration and QAT recipe, the
exported model fixed for the type's device and run in ONNX Runtime, SQNR of its logits against float), once with
PTCFxModule/QATFxModule and once with PTQPT2EModule/QATPT2EModule, each type, each mode, both with their defaults.
The PT2E models are exported with the dynamo exporter (the FX ones with TorchScript, their default).

QAT step cost: process CPU time per training step (forward, MSE loss, backward, Adam step) of the same model and
batch of 60 on one thread, observers and batch norm live (epoch 1) and frozen, median over the steps of one pass over
the training set after a warm-up step; FX vs PT2E. CPU time, not wall time: the machine is shared.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Check, Config, Section, script_main
from bench.quant_quality import DEVICE_OF, QAT_EPOCHS, QAT_LR, Bench, Row, _logits, _ort_logits

__all__ = ["run"]

log = logging.getLogger("bench.bench_pt2e")


class PT2EBench(Bench):
    def pt2e(self, qconfig_type: str, mode: str) -> Row:
        import torch

        from tiexport.wrappers.pt2e import PTQPT2EModule, QATPT2EModule

        t0 = time.perf_counter()
        model = copy.deepcopy(self.float_model)
        calib = self.data.calibration()
        if mode == "PTC":
            w: Any = PTQPT2EModule(model, qconfig_type=qconfig_type, example_inputs=calib[0])
            for _ in range(w.total_epochs):
                w.train()
                for x in calib:
                    w(x)
        else:
            w = QATPT2EModule(model, total_epochs=QAT_EPOCHS, qconfig_type=qconfig_type, example_inputs=calib[0])
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
        result = w.export(self.tests[0], self.work / f"pt2e_{qconfig_type}_{mode}.onnx", device=device)
        return self._row("PT2E", f"PT2E {mode} {qconfig_type}", device, _ort_logits(result.path, self.tests),
                         torch_logits, "pass" if result.parity_passed else "FAIL",
                         result.validation.devices[device].verdict, time.perf_counter() - t0)

    def step_cost(self, path: str, frozen: bool) -> float:
        """Median process CPU ms per QAT step over one pass of the training set."""
        import torch

        from tiexport.wrappers import QATFxModule
        from tiexport.wrappers.pt2e import QATPT2EModule

        model = copy.deepcopy(self.float_model)
        cls: Any = QATFxModule if path == "FX" else QATPT2EModule
        w = cls(model, total_epochs=4, example_inputs=self.train_batches[0],
                num_batch_norm_update_epochs=0 if frozen else None,
                num_observer_update_epochs=0 if frozen else None)
        opt = torch.optim.Adam(w.parameters(), lr=QAT_LR)
        w.train()
        times: list[float] = []
        batches = self.train_batches[: 4 if self.quick else len(self.train_batches)]
        for i, (x, teacher) in enumerate(zip(batches, self.teacher, strict=False)):
            t = time.process_time()
            opt.zero_grad()
            torch.nn.functional.mse_loss(w(x), torch.from_numpy(teacher)).backward()
            opt.step()
            if i > 0:  # the first step warms up
                times.append(1000.0 * (time.process_time() - t))
        return statistics.median(times)

    def float_step_cost(self) -> float:
        import torch

        model = copy.deepcopy(self.float_model).train()
        opt = torch.optim.Adam(model.parameters(), lr=QAT_LR)
        times: list[float] = []
        for i, (x, teacher) in enumerate(zip(self.train_batches, self.teacher, strict=True)):
            t = time.process_time()
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), torch.from_numpy(teacher)).backward()
            opt.step()
            if i > 0:
                times.append(1000.0 * (time.process_time() - t))
        return statistics.median(times)


def run(cfg: Config) -> list[Section]:
    from tiexport.quantization.qconfig import QCONFIG_TYPES

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*(deprecated|quantize_per_tensor).*", category=UserWarning)
    section = Section("pt2e", "PT2E path beside the FX path: quality per type and QAT step cost (digits CNN)",
                      "python bench/bench_pt2e.py" + (" --quick" if cfg.quick else ""))
    t_start = time.perf_counter()
    bench = PT2EBench(cfg)
    types = list(QCONFIG_TYPES) if not cfg.quick else ["WC8_AT8"]
    pairs: list[tuple[str, str, Row, Row]] = []
    for mode in ("PTC", "QAT"):
        for t in types:
            fx = bench.ours("FX", t, mode, f"FX {mode} {t}")
            pt2e = bench.pt2e(t, mode)
            pairs.append((mode, t, fx, pt2e))
    table = ["| mode | qconfig type | fixed for | FX SQNR dB | **PT2E SQNR dB** | PT2E - FX dB | FX acc % | PT2E acc % "
             "| PT2E top-1 agree % | PT2E parity | PT2E verdict | FX s | PT2E s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    worst = float("inf")
    for mode, t, fx, p in pairs:
        delta = p.sqnr_db - fx.sqnr_db
        worst = min(worst, delta)
        table.append(f"| {mode} | {t} | {p.device} | {fx.sqnr_db:.2f} | **{p.sqnr_db:.2f}** | {delta:+.2f} | "
                     f"{fx.accuracy:.2f} | {p.accuracy:.2f} | {p.agreement:.2f} | {p.parity} | {p.verdict} | "
                     f"{fx.seconds:.1f} | {p.seconds:.1f} |")
    costs = {(path, frozen): bench.step_cost(path, frozen) for path in ("FX", "PT2E") for frozen in (False, True)}
    float_ms = bench.float_step_cost()
    steps = ["| QAT step (batch 60, 1 thread) | live ms | frozen ms | live / float | frozen / float |",
             "|---|---:|---:|---:|---:|",
             f"| float (no quantization) | {float_ms:.2f} | {float_ms:.2f} | 1.00 | 1.00 |"]
    for path in ("FX", "PT2E"):
        live, frozen = costs[(path, False)], costs[(path, True)]
        steps.append(f"| {path} | {live:.2f} | {frozen:.2f} | {live / float_ms:.2f} | {frozen / float_ms:.2f} |")
    section.body = [
        f"Float model: {bench.float_acc:.2f} % test accuracy. SQNR of the exported, fixed model's logits in ONNX "
        "Runtime against float, as in the quant_quality section; FX rows are PTCFxModule/QATFxModule, PT2E rows "
        "PTQPT2EModule/QATPT2EModule (torchao 0.18.0 prepare_pt2e / prepare_qat_pt2e with TIDLQuantizer), both "
        "with defaults.",
        "",
        *table,
        "",
        "QAT step cost, median process CPU time per step (forward, loss, backward, Adam), observers and batch norm "
        "live (epoch 1) or frozen from the start:",
        "",
        *steps,
    ]
    section.checks = [Check("worst PT2E - FX SQNR", worst, ">= -0.5 dB", worst >= -0.5, f"{worst + 0.5:+.2f} dB")]
    section.notes.append(f"total wall time {time.perf_counter() - t_start:.0f} s, torch and ORT on 1 thread")
    section.status = "ok"
    return [section.finish()]


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
