"""End to end: train a small CNN -> PTC -> export -> fix -> validate -> parity -> deployment snippet.

``python examples/end_to_end.py --device AM68A --device TDA4VM --out out/`` trains the repo's SmallCNN in float on
scikit-learn's bundled 8x8 digits (no download), calibrates it with ``PTCFxModule`` using the qconfig type each device
wants (per-channel ``WC8_AT8`` for MMAv2 devices, per-tensor symmetric power-of-2 ``WT8SYMP2_AT8SYMP2`` for TDA4VM),
exports it with the device's fix pipeline, and reports validation, parity against the PyTorch model, accuracy in
ONNX Runtime against float, and the edgeai-benchmark config entry. Takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return tuple(train_test_split(x, digits.target, test_size=0.3, random_state=seed, stratify=digits.target))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    import tiexport
    from fixtures.torch_models import SmallCNN

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append", help="target device(s) (default: AM68A)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    parser.add_argument("--epochs", type=int, default=12, help="float training epochs")
    args = parser.parse_args(argv)
    devices = args.device or ["AM68A"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    x_train, x_test, y_train, y_test = load_digits_split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    model = SmallCNN(in_channels=1, num_classes=10, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        model.train()
        for i in torch.randperm(len(xt)).split(64):
            loss = torch.nn.functional.cross_entropy(model(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        float_logits = model(torch.from_numpy(x_test)).numpy()
    float_acc = float((float_logits.argmax(1) == y_test).mean() * 100)
    print(f"float SmallCNN on digits: test accuracy {float_acc:.2f}% ({time.perf_counter() - t0:.1f}s)")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    batch = 60
    calib = [torch.from_numpy(x_train[i:i + batch]) for i in range(0, 240, batch)]
    failed = False
    for device in devices:
        profile = tiexport.get_device(device)
        qconfig = "WT8SYMP2_AT8SYMP2" if profile.power_of_two_scales else "WC8_AT8"
        net = SmallCNN(in_channels=1, num_classes=10, width=16)
        net.load_state_dict(state)
        qmodel = tiexport.PTCFxModule(net.eval(), qconfig_type=qconfig, example_inputs=(calib[0],))
        for _ in range(qmodel.total_epochs):  # each train() call is one calibration epoch
            qmodel.train()
            with torch.no_grad():
                for xb in calib:
                    qmodel(xb)
        qmodel.eval()
        path = args.out / f"smallcnn_{qconfig.lower()}_{profile.name.lower()}.onnx"
        # TIDL runs one image at a time: export at batch 1 (calibration batches can be any size)
        samples = [(calib[0][i:i + 1].numpy(),) for i in range(16)]
        result = qmodel.export(calib[0][:1], path, device=profile.name, parity_inputs=samples)
        dev_report = result.validation.devices[profile.name]

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        logits = np.concatenate([sess.run(None, {name: x_test[i:i + 1]})[0] for i in range(len(x_test))])
        n = len(logits)
        acc = float((logits.argmax(1) == y_test[:n]).mean() * 100)
        ref = float_logits[:n]
        sqnr = 10 * np.log10(np.sum(ref**2) / max(np.sum((ref - logits) ** 2), 1e-30))
        snippet_path = path.with_suffix(".benchmark.py")
        print(f"\n== {profile.name} ({qconfig}) -> {path}")
        print(f"   validate: {dev_report.verdict} ({dev_report.count('error')} errors, "
              f"{dev_report.count('warning')} warnings)")
        print(f"   parity (ONNX Runtime vs PyTorch fake-quant): {result.parity_summary}")
        print(f"   ONNX Runtime accuracy {acc:.2f}% (float {float_acc:.2f}%), logits SQNR vs float {sqnr:.1f} dB")
        if dev_report.verdict == "incompatible":
            failed = True
            print(tiexport.Report(model=str(path), devices={profile.name: dev_report}).to_text())
            continue
        snippet_path.write_text(tiexport.snippet(str(path), profile.name, "benchmark", model_path=path.name,
                                                 metrics={"accuracy_top1%": round(acc, 2)}))
        print(f"   edgeai-benchmark config entry: {snippet_path}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
