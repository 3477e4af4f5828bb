"""QAT step time and PTC calibration throughput: tiexport's wrapper vs the float model vs torch.ao's defaults.

Targets (issue 8):
- QAT: training step time of ``QATFxModule`` / float step (batch 64) <= 1.6 on the digits CNN and on a ResNet-style
  32x32 model; and no slower than torch.ao's default ``prepare_qat_fx`` on the same model.
- PTC: calibration throughput >= 0.3x of float inference throughput with the default qconfig (``PTCFxModule``
  defaults: WC8_AT8, bias calibration 0.01).

In-process; every contender starts from the same seeded weights; a "step" is zero_grad, forward, cross-entropy,
backward, SGD step. Timed in blocks of steps, blocks interleaved across contenders. torch runs on one thread: the
machine is shared, and one thread keeps the ratios from depending on what else runs.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Config, Section, at_least, at_most, have_module, render_timings, script_main, time_callables

__all__ = ["run"]

THREADS = 1


def _batches(name: str, batch: int, n: int, device: str = "cpu") -> list[tuple[Any, Any]]:
    import torch

    from bench.models import digits_batches

    if name == "digits CNN":
        out = digits_batches(batch, n)
    else:
        g = torch.Generator().manual_seed(0)
        out = [(torch.rand((batch, 3, 32, 32), generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(n)]
    return [(x.to(device), y.to(device)) for x, y in out]


def _factory(name: str) -> Callable[[], Any]:
    from bench.models import digits_cnn, resnet_cifar

    return digits_cnn if name == "digits CNN" else resnet_cifar


def _fresh(factory: Callable[[], Any], device: str = "cpu") -> Any:
    import torch

    torch.manual_seed(0)
    return factory().to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()  # a timed block ends when its kernels have run, not when they were queued


def _train_steps(model: Any, batches: list[tuple[Any, Any]], k: int, device: str = "cpu") -> Callable[[], None]:
    import torch
    from torch.nn import functional as F

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    it = itertools.cycle(batches)

    def steps() -> None:
        for _ in range(k):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        _sync(device)

    return steps


def _infer_steps(model: Any, batches: list[tuple[Any, Any]], k: int, device: str = "cpu") -> Callable[[], None]:
    import torch

    it = itertools.cycle(batches)

    def steps() -> None:
        with torch.no_grad():
            for _ in range(k):
                model(next(it)[0])
        _sync(device)

    return steps


def _qat_steps(factory: Callable[[], Any], batches: list[tuple[Any, Any]], k: int, dev: str,
               freeze: tuple[bool, bool] | None = None, **kwargs: Any) -> Callable[[], None]:
    """Training steps of a fresh QATFxModule in its first epoch; ``freeze``: (batch norm, observers) frozen."""
    from tiexport.wrappers import QATFxModule

    w = QATFxModule(_fresh(factory, dev), total_epochs=10, example_inputs=(batches[0][0],), **kwargs)
    w.train()
    if freeze is not None:
        w.freeze(freeze_bn=freeze[0], freeze_observers=freeze[1])
    return _train_steps(w, batches, k, dev)


def _calibration_steps(factory: Callable[[], Any], batches: list[tuple[Any, Any]], k: int, dev: str,
                       **kwargs: Any) -> Callable[[], None]:
    """Calibration forwards of a fresh PTCFxModule in its first epoch (training mode, no backward)."""
    from tiexport.wrappers import PTCFxModule

    w = PTCFxModule(_fresh(factory, dev), example_inputs=(batches[0][0],), **kwargs)
    w.train()
    return _infer_steps(w, batches, k, dev)


def _torch_ao_qat(model: Any, example: Any) -> Any:
    import warnings

    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping(), (example,))


def _torch_ao_frozen(model: Any) -> Any:
    """torch.ao's late-epoch state: observers disabled, batch-norm statistics frozen."""
    import torch

    model.apply(torch.ao.quantization.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    return model


def _unfused(steps: Callable[[], None]) -> Callable[[], None]:
    """``steps`` with tiexport's fused QAT ops switched off (the unfused reference path)."""

    def run() -> None:
        from tiexport.quantization import fused

        before = fused.FUSED_OPS
        fused.FUSED_OPS = False
        try:
            steps()
        finally:
            fused.FUSED_OPS = before

    return run


def _torch_ao_ptq(model: Any, example: Any) -> Any:
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(model.eval(), get_default_qconfig_mapping(), (example,))


def run(cfg: Config) -> list[Section]:
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Config) -> list[Section]:
    command = "python bench/bench_qat.py" + (" --quick" if cfg.quick else "")
    dev = cfg.torch_device
    suffix, where = ("", "") if dev == "cpu" else (f"-{dev}", f" ({dev.upper()})")
    if dev != "cpu":
        command += f" --torch-device {dev}"
    qat = Section(key="qat" + suffix, command=command,
                  title=f"QAT{where}: training step time, QATFxModule vs float vs torch.ao prepare_qat_fx")
    ptc = Section(key="ptc" + suffix, command=command,
                  title=f"PTC{where}: calibration throughput, PTCFxModule vs float inference")
    if not have_module("tiexport.wrappers"):
        for s in (qat, ptc):
            s.status = "skipped"
            s.notes.append("not run: tiexport.wrappers does not exist yet")
        return [qat.finish(), ptc.finish()]
    peers = cfg.peers and have_module("torch.ao.quantization.quantize_fx")
    k = 2 if cfg.quick else 5  # steps per timed block
    models = ("digits CNN", "ResNet-20 32x32")
    for name in models:
        batch = 8 if cfg.quick and name != "digits CNN" else 64
        batches = _batches(name, batch, 4, dev)
        example = batches[0][0]
        factory = _factory(name)
        qat_steps = functools.partial(_qat_steps, factory, batches, k, dev)
        calibration = functools.partial(_calibration_steps, factory, batches, k, dev)

        # ---- QAT step
        funcs: dict[str, Callable[[], None]] = {
            "float step": _train_steps(_fresh(factory, dev).train(), batches, k, dev),
            "QATFxModule step": qat_steps(),
        }
        if not cfg.quick:  # for attribution, not targets
            # the late-epoch state: batch norm and observers frozen
            funcs["QATFxModule step, BN+observers frozen"] = qat_steps(freeze=(True, True))
            # the floor of the first epoch: batch norm updating, observers free
            funcs["QATFxModule step, observers frozen (BN updating)"] = qat_steps(freeze=(False, True))
            # the cost of the exact per-batch percentile (range shrink), which torch.ao's observers do not compute
            funcs["QATFxModule step, range shrink off"] = qat_steps(range_shrink_percentile=0.0)
            # the path before the fused ops of issue 20 (tiexport.quantization.fused; CPU only)
            funcs["QATFxModule step, unfused (FUSED_OPS=False)"] = _unfused(qat_steps())
        if peers:
            funcs["torch.ao prepare_qat_fx step"] = _train_steps(_torch_ao_qat(_fresh(factory, dev), example),
                                                                 batches, k, dev)
            if not cfg.quick:  # next to QATFxModule's frozen row
                funcs["torch.ao prepare_qat_fx step, BN+observers frozen"] = _train_steps(
                    _torch_ao_frozen(_torch_ao_qat(_fresh(factory, dev), example)), batches, k, dev)
        t = time_callables(funcs, cfg, warmup=1)
        for tm in t.values():  # per step
            tm.walls = [w / k for w in tm.walls]
        qat.body += [f"**{name}**, batch {batch}, {k} steps per timed block (times per step):", ""]
        qat.body += render_timings(t, baseline="float step")
        qat.body.append("")
        qat.checks.append(at_most(f"{name}: QATFxModule / float step", t["QATFxModule step"].median /
                                  t["float step"].median, 1.6))
        if peers:
            qat.checks.append(at_most(f"{name}: QATFxModule / torch.ao QAT step", t["QATFxModule step"].median /
                                      t["torch.ao prepare_qat_fx step"].median, 1.0))

        # ---- PTC calibration throughput
        pfuncs: dict[str, Callable[[], None]] = {
            "float inference": _infer_steps(_fresh(factory, dev).eval(), batches, k, dev),
            "PTCFxModule calibration": calibration(),
        }
        if not cfg.quick:  # for attribution, not targets
            # without bias calibration: one forward instead of two
            pfuncs["PTCFxModule calibration, bias_calibration_factor=0"] = calibration(bias_calibration_factor=0.0)
            pfuncs["PTCFxModule calibration, range shrink off"] = calibration(range_shrink_percentile=0.0)
        if peers:
            pfuncs["torch.ao prepare_fx calibration"] = _infer_steps(_torch_ao_ptq(_fresh(factory, dev), example),
                                                                     batches, k, dev)
        p = time_callables(pfuncs, cfg, warmup=1)
        for tm in p.values():  # per batch
            tm.walls = [w / k for w in tm.walls]
        ptc.body += [f"**{name}**, batch {batch}, {k} batches per timed block (times per batch; throughput = "
                     f"{batch} / time, so the throughput ratio is the inverse of the time ratio):", ""]
        ptc.body += render_timings(p, baseline="float inference")
        ptc.body.append("")
        ratio = p["float inference"].median / p["PTCFxModule calibration"].median  # throughput ratio
        ptc.checks.append(at_least(f"{name}: PTC calibration / float inference throughput", ratio, 0.3))
    qat.notes.append(f"torch threads: {THREADS}; QATFxModule(total_epochs=10) in its first epoch (observers and BN "
                     "updating, the costly phase); torch.ao: get_default_qat_qconfig_mapping() (x86 default)")
    ptc.notes.append(f"torch threads: {THREADS}; PTCFxModule defaults (WC8_AT8, bias_calibration_factor=0.01, "
                     "total_epochs=2) in its first epoch; torch.ao: prepare_fx with get_default_qconfig_mapping()")
    if dev == "cuda":
        import torch

        gpu = f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}"
        qat.notes.append(gpu)
        ptc.notes.append(gpu)
    if not peers:
        for s in (qat, ptc):
            s.notes.append("torch.ao not run: --no-peers or torch.ao.quantization.quantize_fx missing")
    return [qat.finish(), ptc.finish()]


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
