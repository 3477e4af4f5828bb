"""Accuracy of the timm families after tiexport, on trained weights (issue 15 follow-up).

``bench/zoo.py`` runs random-init models: it proves the chain (wrap, export, fix, validate, parity, snippet) but says
nothing about accuracy. Here each model is first trained briefly on scikit-learn's bundled digits (8x8 images
upscaled to 64x64, 3 channels; 1500 training images, 297 held out; no download), then wrapped with ``PTCFxModule``,
calibrated on 64 training images and exported with ``export(device=)`` (fix for the device, parity, validate).
Reported on the 297 held-out images: float top-1 in torch, fake-quant top-1 in torch, top-1 of the fixed ONNX model
in ONNX Runtime with graph optimizations off (as tiexport's parity and TI's QDQ guidance run it) and on (ONNX
Runtime then fuses Q/DQ into integer QLinear kernels, closer to an integer accelerator), and how often each one's
prediction equals the fake-quant module's, image by image at batch 1 (the decision-level answer to "does ONNX Runtime
compute what PyTorch computed"). Same venv as ``bench/zoo.py``::

    PYTHONPATH=. /work/venv_timm/bin/python bench/zoo_accuracy.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.zoo import COMBOS, MODELS  # noqa: E402


def _digits(size: int) -> tuple[Any, Any, Any, Any]:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def run_one(name: str, qconfig: str, steps: int, out: Path) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch
    import torch.nn.functional as F

    from tiexport.wrappers import PTCFxModule

    size = MODELS.get(name, 64)
    device = COMBOS[qconfig]
    row: dict[str, Any] = {"model": name, "qconfig": qconfig, "device": device, "steps": steps}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10}
    if name.startswith(("vit", "deit")):
        kwargs["img_size"] = size
    model = timm.create_model(name, **kwargs)
    xtr, ytr, xte, yte = _digits(size)
    weights = out / f"{name}_{steps}steps.pt"  # trained once, shared by the qconfig types
    if weights.exists():
        model.load_state_dict(torch.load(weights))
    else:
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(xtr), (32,), generator=g)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), weights)
    model.eval()
    row["train_s"] = time.perf_counter() - t0
    with torch.no_grad():
        row["float_top1"] = float((model(xte).argmax(1) == yte).float().mean())
    calib = [xtr[i * 16:(i + 1) * 16] for i in range(4)]
    wrapper = PTCFxModule(model, qconfig_type=qconfig, example_inputs=calib[0])
    for _ in range(wrapper.total_epochs):
        wrapper.train()
        for x in calib:
            wrapper(x)
    wrapper.eval()
    with torch.no_grad():  # one image at a time, as ONNX Runtime runs them (a batch sums in another order)
        fq = torch.cat([wrapper(xte[i:i + 1]) for i in range(len(xte))]).argmax(1)
    row["fakequant_top1"] = float((fq == yte).float().mean())
    path = out / f"{name}_{qconfig}_trained.onnx"
    result = wrapper.export(xte[:1], path, device=device, parity_inputs=[(xte[i:i + 1].numpy(),) for i in range(4)])
    row["verdict"] = result.validation.devices[device].verdict
    row["parity"] = result.parity.mode if result.parity is not None else "-"
    for key, level in (("onnx", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                       ("onnx_int", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name_in = sess.get_inputs()[0].name
        preds = np.array([int(sess.run(None, {name_in: xte[i:i + 1].numpy()})[0].argmax())
                          for i in range(len(xte))])
        row[f"{key}_top1"] = float((preds == yte.numpy()).mean())
        row[f"{key}_agrees_with_fakequant"] = float((preds == fq.numpy()).mean())
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--qconfigs", default=",".join(COMBOS))
    p.add_argument("--steps", type=int, default=300, help="training steps of 32 images (AdamW 1e-3)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "_work" / "zoo_accuracy")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "QCONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("ROW " + json.dumps(run_one(args.one[0], args.one[1], args.steps, args.out)), flush=True)
        return 0
    print("| model | qconfig -> device | float top-1 | fake-quant top-1 | ORT top-1 | ORT = fake-quant | "
          "ORT integer kernels top-1 | ORT int = fake-quant | verdict | parity | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for qconfig in args.qconfigs.split(","):
            proc = subprocess.run([sys.executable, __file__, "--one", name, qconfig, "--steps", str(args.steps),
                                   "--out", str(args.out)], capture_output=True, text=True, timeout=3600)
            rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if not rows:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
                print(f"| {name} | {qconfig} | FAIL: {tail} | | | | | | | | |", flush=True)
                continue
            r = rows[0]
            print(f"| {name} | {qconfig} -> {r['device']} | {100 * r['float_top1']:.1f} % | "
                  f"{100 * r['fakequant_top1']:.1f} % | {100 * r['onnx_top1']:.1f} % | "
                  f"{100 * r['onnx_agrees_with_fakequant']:.1f} % | {100 * r['onnx_int_top1']:.1f} % | "
                  f"{100 * r['onnx_int_agrees_with_fakequant']:.1f} % | {r['verdict']} | {r['parity']} | "
                  f"{r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
