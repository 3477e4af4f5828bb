"""CUDA smoke run of the wrapper and export: PTC and QAT on the GPU, export, fix, validate, parity.

Run on a machine with a GPU: ``python bench/gpu_smoke.py --out DIR`` (``--device cpu`` runs the same steps on the
CPU). Writes ``DIR/gpu_smoke.json`` with one record per case and exits 1 if any case failed. Small models and few
steps: this checks that nothing in the wrapper or the exporter hard-codes the CPU, not accuracy.

``--bench`` then runs the QAT benchmarks on the same device, one script for a device session (issue 20):
``bench/bench_qat.py`` (QAT step / float step, live and frozen, next to torch.ao's; PTC calibration) and
``bench/bench_qat_ops.py`` (ops and kernel launches per step, ours vs torch.ao's). Their sections go to
``DIR/RESULTS-<device>.md`` (copy them into bench/RESULTS.md) and their verdicts into ``gpu_smoke.json``; a
benchmark MISS does not fail the smoke run, a benchmark that raises does. ``--runs`` sets the timed rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _case(name: str, fn: Any, records: list[dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        info = fn()
        records.append({"case": name, "ok": True, "seconds": round(time.perf_counter() - t0, 2), **info})
    except Exception as exc:
        records.append({"case": name, "ok": False, "seconds": round(time.perf_counter() - t0, 2),
                        "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})


def main(argv: list[str] | None = None) -> int:
    import torch

    import tiexport
    from fixtures.torch_models import SmallCNN, TransformerBlock

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0, help="torch seed at the start of every case")
    parser.add_argument("--bench", action="store_true", help="then run the QAT benchmarks on the device")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per benchmark contender (--bench)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    records: list[dict[str, Any]] = []

    def summary(result: Any, device: str | None) -> dict[str, Any]:
        names = [device] if device else list(result.validation.devices)
        return {
            "parity": result.parity_summary,
            "parity_passed": result.parity_passed,
            "verdicts": {d: result.validation.devices[d].verdict for d in names},
            "errors": [f"{f.rule_id} {f.node}: {f.message}" for f in result.validation.findings
                       if f.severity == "error"][:10],
        }

    def ptc_cnn() -> dict[str, Any]:
        model = SmallCNN().to(dev)
        x = torch.rand(8, 3, 32, 32, device=dev)
        q = tiexport.PTCFxModule(model, qconfig_type="WC8_AT8", example_inputs=(x[:1],))
        for _ in range(q.total_epochs):
            q.train()
            with torch.no_grad():
                for _ in range(4):
                    q(torch.rand(8, 3, 32, 32, device=dev))
        q.eval()
        assert next(q.module.parameters()).device.type == dev.type, "wrapped module left the device"
        res = q.export(x[:1], args.out / "ptc_cnn_am68a.onnx", device="AM68A")
        return summary(res, "AM68A")

    def qat_cnn_tda4vm() -> dict[str, Any]:
        model = SmallCNN().to(dev)
        q = tiexport.QATFxModule(model, total_epochs=2, qconfig_type="WT8SYMP2_AT8SYMP2",
                                 example_inputs=(torch.rand(1, 3, 32, 32, device=dev),))
        opt = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(2):
            q.train()
            for _ in range(4):
                x = torch.rand(16, 3, 32, 32, device=dev)
                loss = torch.nn.functional.cross_entropy(q(x), torch.randint(0, 10, (16,), device=dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
        q.eval()
        res = q.export(torch.rand(1, 3, 32, 32, device=dev), args.out / "qat_cnn_tda4vm.onnx", device="TDA4VM")
        return summary(res, "TDA4VM")

    def ptc_transformer(exporter: str) -> dict[str, Any]:
        model = TransformerBlock().to(dev)
        q = tiexport.PTCFxModule(model, qconfig_type="MSA_WC8_AT8",
                                 example_inputs=(torch.randn(1, 16, 32, device=dev),))
        for _ in range(q.total_epochs):
            q.train()
            with torch.no_grad():
                for _ in range(4):
                    q(torch.randn(4, 16, 32, device=dev))
        q.eval()
        res = q.export(torch.randn(1, 16, 32, device=dev), args.out / f"ptc_transformer_{exporter}.onnx",
                       device="AM68A", exporter=exporter)
        return summary(res, "AM68A")

    def seeded(fn: Any) -> Any:
        def run() -> Any:
            torch.manual_seed(args.seed)  # the same random model and data for every exporter and device
            return fn()
        return run

    _case("ptc_cnn_WC8_AT8_AM68A", seeded(ptc_cnn), records)
    _case("qat_cnn_WT8SYMP2_AT8SYMP2_TDA4VM", seeded(qat_cnn_tda4vm), records)
    _case("ptc_transformer_torchscript", seeded(lambda: ptc_transformer("torchscript")), records)
    _case("ptc_transformer_dynamo", seeded(lambda: ptc_transformer("dynamo")), records)
    if args.bench:
        for module in ("bench.bench_qat", "bench.bench_qat_ops"):
            _case(f"bench {module}", lambda module=module: _bench(module, dev.type, args.out, args.runs), records)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None}
    (args.out / "gpu_smoke.json").write_text(json.dumps({"env": env, "cases": records}, indent=2))
    for r in records:
        line = f"{'OK  ' if r['ok'] else 'FAIL'} {r['case']} {r['seconds']}s"
        if r["ok"] and "checks" in r:
            line += "".join(f"\n     {c}" for c in r["checks"])
        elif r["ok"]:
            line += f" parity: {r.get('parity')} verdicts: {r.get('verdicts')}"
        else:
            line += f" {r['error']}"
        print(line)
    print(json.dumps(env))
    return 0 if all(r["ok"] for r in records) else 1


def _bench(module: str, device: str, out: Path, runs: int) -> dict[str, Any]:
    """Run one benchmark module on ``device``; its sections go to ``out/RESULTS-<device>.md``."""
    import importlib

    from bench.common import Config, emit

    cfg = Config(quick=False, runs=runs, warmup=1, work=out / "bench_work", peers=True,
                 results=out / f"RESULTS-{device}.md", torch_device=device)
    cfg.work.mkdir(parents=True, exist_ok=True)
    sections = importlib.import_module(module).run(cfg)
    emit(sections, cfg)
    failed = [s.key for s in sections if s.status == "failed"]
    if failed:
        raise RuntimeError(f"benchmark sections failed: {', '.join(failed)}")
    return {"checks": [f"{'PASS' if c.passed else 'MISS'} {c.metric}: {c.value:.3g} ({c.target})"
                       for s in sections for c in s.checks]}


if __name__ == "__main__":
    sys.exit(main())
