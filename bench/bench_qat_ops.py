"""Ops dispatched per QAT training step: tiexport's QATFxModule vs torch.ao's default ``prepare_qat_fx`` (issue 20).

A QAT step on a GPU is launch-bound: what it costs follows how many ops it dispatches, most of them tiny. The CPU
proxy counted here: ``torch.profiler`` over one training step (zero_grad, forward, cross-entropy, backward, SGD
step with momentum; batch 64; one torch thread), after two warm-up steps. **Top-level ops**: dispatcher ops
(``aten::...``, torch.ao's fused ``aten::fused_moving_avg_obs_fake_quant``, tiexport's ``tiexport_qat::...``)
with no dispatcher op above them, i.e. the ops the Python code and the autograd engine dispatch themselves; the
ops they run inside (a fused op's own internals, ``conv2d`` -> ``convolution``) are not counted again. **All ops**
counts those too. On CUDA the section also counts kernel launches (``cudaLaunchKernel`` and its variants).

Contenders: QATFxModule in its first epoch (observers and batch norm updating: "live") and with batch norm and
observers frozen (the later epochs), each with the fused ops (:mod:`tiexport.quantization.fused`, the default)
and without (``fused.FUSED_OPS = False``: the path before issue 20); torch.ao's default QAT qconfig mapping live
and with observers disabled and batch norm frozen; the float model. Also the step time of the fused and unfused
paths, interleaved rounds (median of ``--runs``; on CPU the process's CPU time, which a shared machine's load
inflates less than wall time), since fusing on CPU saves dispatch only.

Target (issue 20): top-level ops per step <= torch.ao's on both bench models, observers live.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Config,
    Section,
    Timing,
    at_most,
    have_module,
    render_timings,
    script_main,
    time_callables,
)

__all__ = ["OpCount", "count_step_ops", "run"]

THREADS = 1
_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class OpCount:
    """Ops of one profiled step."""

    def __init__(self, top: int, total: int, launches: int, top_names: dict[str, int]) -> None:
        self.top, self.total, self.launches, self.top_names = top, total, launches, top_names


def _is_op(name: str) -> bool:
    # dispatcher ops are "namespace::name"; the profiler's own ranges (autograd::engine..., Optimizer.step#...,
    # torch::autograd::AccumulateGrad) are not ops
    return "::" in name and not name.startswith(("autograd::", "torch::autograd::", "Optimizer.", "profiler"))


def count_step_ops(step: Callable[[], None], cuda: bool = False) -> OpCount:
    """Profile one call of ``step`` and count its dispatcher ops (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    top = total = launches = 0
    names: dict[str, int] = {}
    for event in prof.profiler.function_events:
        if event.name in _LAUNCHES:
            launches += 1
            continue
        if not _is_op(event.name):
            continue
        total += 1
        parent = event.cpu_parent
        while parent is not None and not _is_op(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            top += 1
            names[event.name] = names.get(event.name, 0) + 1
    return OpCount(top, total, launches, names)


@contextlib.contextmanager
def _fused(enabled: bool) -> Iterator[None]:
    from tiexport.quantization import fused

    before = fused.FUSED_OPS
    fused.FUSED_OPS = enabled
    try:
        yield
    finally:
        fused.FUSED_OPS = before


def _one_step(model: Any, batches: list[tuple[Any, Any]], dev: str) -> Callable[[], None]:
    """A step function over ``batches`` in turn (SGD with momentum, as bench_qat)."""
    from bench.bench_qat import _train_steps

    return _train_steps(model, batches, 1, dev)


def _time_cpu(funcs: dict[str, Callable[[], None]], cfg: Config) -> dict[str, Timing]:
    """:func:`bench.common.time_callables` by the process's CPU time instead of wall time: with one torch thread
    it is the step's own compute, which waiting for a core on a shared machine does not inflate (it still moves
    with cache and memory-bandwidth contention)."""
    names = list(funcs)
    timings = {n: Timing(n) for n in names}
    for round_ in range(1 + cfg.runs):  # one warm-up round
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.process_time()
            funcs[name]()
            if round_ >= 1:
                timings[name].walls.append(time.process_time() - start)
    return timings


def _block(step: Callable[[], None], use_fused: bool, k: int) -> None:
    with _fused(use_fused):
        for _ in range(k):
            step()


def _float(factory: Callable[[], Any], dev: str) -> Any:
    from bench.bench_qat import _fresh

    return _fresh(factory, dev).train()


def _tiexport(factory: Callable[[], Any], batches: list[tuple[Any, Any]], dev: str, frozen: bool) -> Any:
    from bench.bench_qat import _fresh
    from tiexport.wrappers import QATFxModule

    w = QATFxModule(_fresh(factory, dev), total_epochs=10, example_inputs=(batches[0][0],))
    w.train()
    if frozen:
        w.freeze(freeze_bn=True, freeze_observers=True)
    return w


def _torch_ao(factory: Callable[[], Any], batches: list[tuple[Any, Any]], dev: str, frozen: bool) -> Any:
    from bench.bench_qat import _fresh, _torch_ao_frozen, _torch_ao_qat

    model = _torch_ao_qat(_fresh(factory, dev), batches[0][0])
    return _torch_ao_frozen(model) if frozen else model


def run(cfg: Config) -> list[Section]:
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Config) -> list[Section]:
    from bench.bench_qat import _batches, _factory

    command = "python bench/bench_qat_ops.py" + (" --quick" if cfg.quick else "")
    dev = cfg.torch_device
    suffix, where = ("", "") if dev == "cpu" else (f"-{dev}", f" ({dev.upper()})")
    if dev != "cpu":
        command += f" --torch-device {dev}"
    section = Section(key="qat-ops" + suffix, command=command,
                      title=f"QAT ops per step{where}: QATFxModule (fused / unfused) vs torch.ao prepare_qat_fx")
    if not have_module("tiexport.quantization.fused"):
        section.status = "skipped"
        section.notes.append("not run: tiexport.quantization.fused does not exist yet")
        return [section.finish()]
    cuda = dev == "cuda"
    peers = cfg.peers and have_module("torch.ao.quantization.quantize_fx")
    for name in ("digits CNN", "ResNet-20 32x32"):
        batch = 8 if cfg.quick and name != "digits CNN" else 64
        batches = _batches(name, batch, 3, dev)
        factory = _factory(name)
        # (label, model maker, fused ops on)
        ours = functools.partial(_tiexport, factory, batches, dev)
        rows: list[tuple[str, Callable[[], Any], bool]] = [
            ("float step", functools.partial(_float, factory, dev), True),
            ("QATFxModule, live", functools.partial(ours, False), True),
            ("QATFxModule, BN+observers frozen", functools.partial(ours, True), True),
        ]
        if not cfg.quick:  # the path before the fused ops, for the record
            rows += [("QATFxModule unfused (FUSED_OPS=False), live", functools.partial(ours, False), False),
                     ("QATFxModule unfused (FUSED_OPS=False), BN+observers frozen", functools.partial(ours, True),
                      False)]
        if peers:
            theirs = functools.partial(_torch_ao, factory, batches, dev)
            rows += [("torch.ao prepare_qat_fx, live", functools.partial(theirs, False), True),
                     ("torch.ao prepare_qat_fx, BN+observers frozen", functools.partial(theirs, True), True)]
        counts: dict[str, OpCount] = {}
        steppers: dict[str, Callable[[], None]] = {}
        for label, make, use_fused in rows:
            with _fused(use_fused):
                step = _one_step(make(), batches, dev)
                step()
                step()  # warm-up: the first steps read flags, size per-channel buffers, allocate momentum
                counts[label] = count_step_ops(step, cuda)
            steppers[label] = step
        section.body += [f"**{name}**, batch {batch}, one training step (ops per step):", ""]
        head = "| contender | top-level ops | all ops |" + (" kernel launches |" if cuda else "")
        sep = "|---|---:|---:|" + ("---:|" if cuda else "")
        if peers:
            head += " top-level ops vs torch.ao (same state) |"
            sep += "---:|"
        section.body += [head, sep]
        for label, c in counts.items():
            row = f"| {label} | {c.top} | {c.total} |" + (f" {c.launches} |" if cuda else "")
            if peers:
                peer = "torch.ao prepare_qat_fx, " + ("live" if label.endswith("live") else
                                                        "BN+observers frozen")
                row += f" {c.top / counts[peer].top:.2f} |" if label != "float step" else " - |"
            section.body.append(row)
        section.body.append("")
        if peers:
            for state in ("live", "BN+observers frozen"):
                ours, theirs = counts[f"QATFxModule, {state}"], counts[f"torch.ao prepare_qat_fx, {state}"]
                check = at_most(f"{name}: QATFxModule / torch.ao top-level ops per step, {state}",
                                ours.top / theirs.top, 1.0)
                if state == "live":  # the target; the frozen state is recorded for reference
                    section.checks.append(check)
        # ---- step time, fused vs unfused (interleaved rounds), for the record: fusion saves dispatch only
        k = 2 if cfg.quick else 5  # steps per timed block
        timed: dict[str, Callable[[], None]] = {}
        labels = [label for label in ("float step", "QATFxModule, live", "QATFxModule unfused (FUSED_OPS=False), live",
                                      "QATFxModule, BN+observers frozen",
                                      "QATFxModule unfused (FUSED_OPS=False), BN+observers frozen")
                  if label in steppers]
        if peers:
            labels.append("torch.ao prepare_qat_fx, live")
        for label in labels:
            use_fused = "unfused" not in label

            timed[label] = functools.partial(_block, steppers[label], use_fused, k)
        t = time_callables(timed, cfg, warmup=1) if cuda else _time_cpu(timed, cfg)
        for tm in t.values():
            tm.walls = [w / k for w in tm.walls]
        clock = "wall time" if cuda else "CPU time of this process (time.process_time)"
        section.body += [f"Step time ({clock}), {k} steps per timed block, blocks interleaved (times per step):",
                         ""]
        section.body += render_timings(t, baseline="float step")
        section.body.append("")
    section.notes.append(f"torch threads: {THREADS}; QATFxModule(total_epochs=10), default qconfig (WC8_AT8); "
                         "torch.ao: get_default_qat_qconfig_mapping() (x86 default); 'frozen': "
                         "QATFxModule.freeze(), torch.ao disable_observer + freeze_bn_stats")
    section.notes.append("top-level ops: dispatcher ops with no dispatcher op above them in the profile (a fused "
                         "op counts once, whatever it runs inside); all ops: every dispatcher op")
    if not cuda:
        section.notes.append("CPU only: tiexport's fused ops have CPU kernels (the existing vectorized code); on "
                             "CUDA the unfused path runs, so the CUDA counts and launches do not move until a CUDA "
                             "kernel is registered for them")
    else:
        section.notes.append(f"GPU: {torch_device_name()}")
    if not peers:
        section.notes.append("torch.ao not run: --no-peers or torch.ao.quantization.quantize_fx missing")
    return [section.finish()]


def torch_device_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
