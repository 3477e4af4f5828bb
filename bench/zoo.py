"""Real model families end to end (issue 15): timm models, random init, through the whole tiexport chain.

For each model x flow (``--flows PTC,QAT``: ``PTCFxModule``, or ``QATFxModule`` for 2 short epochs) x qconfig type
(WC8_AT8 on an MMAv2 device, WT8SYMP2_AT8SYMP2 on TDA4VM) x exporter: wrap, calibrate on synthetic images (seeded
uniform noise, a few batches), ``export(device=)`` at batch 1 (export, fix, parity against the torch module in ONNX
Runtime, validate), then ``tiexport.snippet``. Each row runs in its own process. One table row per run: wrap /
export status, the wrap-time warnings (modules left unfolded or float), the verdict with its errors and warnings by
rule, parity (``pass`` end to end, ``pass (layer-local)`` when only the layer-by-layer comparison passes, see
``check_parity(local=)``; max LSB, % of elements within 1 LSB and SQNR of the worst output end to end; the
layer-local worst max LSB and exact share; ONNX Runtime's optimized vs unoptimized run of the same file in output
LSB), whether a snippet was generated, seconds and the row's peak RSS.

timm is for this benchmark only, in a separate virtual environment (it is not a dependency of tiexport or its
tests)::

    python3 -m venv /work/venv_timm && /work/venv_timm/bin/pip install timm   # pulls torch + torchvision
    # tiexport and its ONNX dependencies from the main checkout's venv:
    echo /work/main/.venv/lib/python3.11/site-packages > /work/venv_timm/lib/python3.11/site-packages/main.pth
    PYTHONPATH=/work/main /work/venv_timm/bin/python bench/zoo.py --write

``--write`` replaces the zoo section of ``bench/RESULTS.md`` (between ``<!-- zoo -->`` markers) with the table.
The in-repo models reproducing each family's pattern, run by CI, are in ``fixtures/zoo_models.py``
(``tests/wrappers/test_zoo_families.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- zoo -->", "<!-- /zoo -->"

#: timm name -> input size (small inputs: the pattern matters here, not the resolution)
MODELS: dict[str, int] = {
    "resnet18": 64,
    "mobilenetv2_100": 64,
    "mobilenetv3_large_100": 64,
    "efficientnet_b0": 64,
    "efficientnet_lite0": 64,
    "regnetx_002": 64,
    "regnety_002": 64,
    "convnext_atto": 64,
    "vit_tiny_patch16_224": 64,
    "deit_tiny_patch16_224": 64,
}
COMBOS = {"WC8_AT8": "AM68A", "WT8SYMP2_AT8SYMP2": "TDA4VM"}


@dataclass
class Row:
    model: str
    qconfig: str
    device: str
    exporter: str
    flow: str = "PTC"
    wrap: str = "-"
    unquantized: int = 0
    export: str = "-"
    verdict: str = "-"
    problems: str = ""
    max_lsb: float | None = None
    within_1: float | None = None
    sqnr: float | None = None
    parity: str = "-"
    local_lsb: float | None = None
    local_exact: float | None = None
    ort_self_lsb: float | None = None
    snippet: str = "-"
    seconds: float = 0.0
    peak_mb: float | None = None
    notes: list[str] = field(default_factory=list)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def run_one(name: str, size: int, qconfig: str, exporter: str, qat: bool, out: Path, batches: int) -> Row:
    import timm
    import torch

    import tiexport
    from tiexport.wrappers import PTCFxModule, QATFxModule

    device = COMBOS[qconfig]
    row = Row(name, qconfig, device, exporter, flow="QAT" if qat else "PTC")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10}
    if name.startswith(("vit", "deit")):
        kwargs["img_size"] = size
    model = timm.create_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.rand(4, 3, size, size, generator=g) for _ in range(batches)]
    handler = _Warnings()
    logging.getLogger("tiexport").addHandler(handler)
    try:
        try:
            if qat:
                wrapper: Any = QATFxModule(model, total_epochs=2, qconfig_type=qconfig, example_inputs=data[0])
                opt = torch.optim.SGD(wrapper.parameters(), lr=1e-4)
                for _ in range(2):
                    wrapper.train()
                    for x in data:
                        loss = wrapper(x).square().mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
            else:
                wrapper = PTCFxModule(model, qconfig_type=qconfig, example_inputs=data[0])
                for _ in range(wrapper.total_epochs):
                    wrapper.train()
                    for x in data:
                        wrapper(x)
            wrapper.eval()
            row.wrap = "ok"
            row.unquantized = len(getattr(wrapper, "unquantized", {}))
        except Exception as exc:  # a benchmark row, not a crash: record and go on
            row.wrap = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return row
        path = out / f"{name}_{qconfig}_{exporter}{'_qat' if qat else ''}.onnx"
        samples = [(torch.rand(1, 3, size, size, generator=g).numpy(),) for _ in range(4)]
        try:
            result = wrapper.export(data[0][:1], path, device=device, exporter=exporter, parity_inputs=samples)
            row.export = "ok"
        except Exception as exc:
            row.export = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return row
        dev = result.validation.devices[device]
        row.verdict = dev.verdict
        counts = Counter(f"{f.rule_id}" for f in dev.findings if f.severity in ("error", "warning"))
        row.problems = " ".join(f"{k}x{v}" for k, v in sorted(counts.items()))
        if result.parity is not None:
            worst = max(result.parity.outputs.values(), key=lambda m: (m.max_lsb or 0.0))
            row.max_lsb, row.within_1, row.sqnr = worst.max_lsb, worst.within_1_lsb, worst.sqnr_db
            rep = result.parity
            row.parity = {"end-to-end": "pass", "layer-local": "pass (layer-local)"}.get(rep.mode, "FAIL")
            if rep.local is not None:
                worst_local = rep.local.worst
                if worst_local is not None:
                    row.local_lsb, row.local_exact = worst_local[1].max_lsb, worst_local[1].exact
                row.ort_self_lsb = rep.local.ort_self_lsb
        try:
            tiexport.snippet(str(path), device, "benchmark", model_path=path.name)
            row.snippet = "yes"
        except Exception as exc:
            row.snippet = f"refused ({type(exc).__name__})"
    finally:
        logging.getLogger("tiexport").removeHandler(handler)
        row.seconds = time.perf_counter() - t0
        row.notes = [r for r in handler.records if "float island" in r or "batch norm" in r][:3]
    return row


def _run_child(name: str, qconfig: str, exporter: str, flow: str, args: argparse.Namespace) -> Row:
    cmd = [sys.executable, __file__, "--one", name, qconfig, exporter, flow, "--out", str(args.out),
           "--batches", str(args.batches)] + (["--size", str(args.size)] if args.size else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return Row(**json.loads(line[4:]))
    row = Row(name, qconfig, COMBOS[qconfig], exporter, flow=flow, seconds=time.perf_counter() - t0)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    row.wrap = f"FAIL: child exited {proc.returncode}: {tail[:120]}"
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    lines = ["| model | flow | qconfig -> device | exporter | wrap | unquantized modules | export | verdict | "
             "errors/warnings by rule | parity | max LSB | within 1 LSB | SQNR dB | layer-local max LSB / exact | "
             "ORT opt vs no-opt LSB | snippet | s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        within = "-" if r.within_1 is None else f"{100 * r.within_1:.2f} %"
        local = "-" if r.local_lsb is None else (f"{r.local_lsb:.0f} / "
                                                 f"{'-' if r.local_exact is None else f'{100 * r.local_exact:.2f} %'}")
        lines.append(f"| {r.model} | {r.flow} | {r.qconfig} -> {r.device} | {r.exporter} | {r.wrap} | "
                     f"{r.unquantized} | {r.export} | {r.verdict} | {r.problems or '-'} | {r.parity} | "
                     f"{_fmt(r.max_lsb, '.0f')} | "
                     f"{within} | {_fmt(r.sqnr, '.1f')} | {local} | {_fmt(r.ort_self_lsb, '.0f')} | {r.snippet} | "
                     f"{r.seconds:.0f} | {_fmt(r.peak_mb, '.0f')} |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    body = RESULTS.read_text() if RESULTS.exists() else ""
    block = f"{START}\n{text}\n{END}"
    if START in body and END in body:
        head, rest = body.split(START, 1)
        body = head + block + rest.split(END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    p.add_argument("--qconfigs", default=",".join(COMBOS), help="WC8_AT8 and/or WT8SYMP2_AT8SYMP2")
    p.add_argument("--exporters", default="torchscript,dynamo")
    p.add_argument("--flows", default="PTC", help="PTC (PTCFxModule) and/or QAT (QATFxModule, 2 short epochs)")
    p.add_argument("--qat", action="store_true", help="same as --flows QAT")
    p.add_argument("--one", nargs=4, metavar=("MODEL", "QCONFIG", "EXPORTER", "FLOW"), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help="input size for every model (default: per model)")
    p.add_argument("--batches", type=int, default=4, help="calibration batches of 4 images")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "_work" / "zoo")
    p.add_argument("--write", action="store_true", help="write the table to bench/RESULTS.md (zoo section)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:  # one row in this process (the parent runs each row in a child: its own peak RSS and time)
        name, qconfig, exporter, flow = args.one
        row = run_one(name, args.size or MODELS.get(name, 64), qconfig, exporter, flow == "QAT", args.out,
                      args.batches)
        row.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("ROW " + json.dumps(asdict(row)), flush=True)
        return 0
    import timm
    import torch

    flows = ["QAT"] if args.qat else args.flows.split(",")
    rows = []
    for name in args.models.split(","):
        for flow in flows:
            for qconfig in args.qconfigs.split(","):
                for exporter in args.exporters.split(","):
                    row = _run_child(name, qconfig, exporter, flow, args)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
                    for note in row.notes:
                        print(f"    warning: {note}", flush=True)
    text = (f"## Real model families end to end (bench/zoo.py)\n\n"
            f"timm {timm.__version__}, torch {torch.__version__}, random init, {'/'.join(flows)} on "
            f"{args.batches} synthetic batches of 4, export at batch 1, parity on 4 random images against the torch "
            f"module (pass: <= 1 LSB on >= 99.9 % of elements). Command: `PYTHONPATH=. /work/venv_timm/bin/python "
            f"bench/zoo.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table(rows)}\n")
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
