"""Scaling: validate and fix time against node count over the scaled ResNet family (1x, 4x, 16x blocks).

Target (issue 8): linear; report the slope and the ratio of the 16x time to the 1x time (<= 20). Measured in-process
(``tiexport.validate(path)``, ``tiexport.fix(path, device="AM68A")``, each reading the file itself), so interpreter
start-up, a constant, does not flatten the curve. The node ratio 16x/1x is shown beside the time ratio: a time
ratio well above it would mean superlinear work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Config, Section, Timing, at_most, have_module, linear_fit, script_main, time_callables

__all__ = ["run"]

DEVICE = "AM68A"


def _family(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(multipliers, input shape, base width)."""
    if cfg.quick:
        return (1, 2), (1, 3, 32, 32), 4
    return (1, 4, 16), (1, 3, 64, 64), 16


def run(cfg: Config) -> list[Section]:
    import onnx

    from bench.models import float_onnx, ort_qdq_onnx, scaled_resnet
    from tiexport.validators.validate import validate

    s = Section(key="scaling", title="scaling: validate and fix time vs node count (scaled ResNet family)",
                command="python bench/bench_scaling.py" + (" --quick" if cfg.quick else ""))
    mults, shape, width = _family(cfg)
    fix_fn: Callable[..., object] | None = None
    if have_module("tiexport.workflows.fix"):
        from tiexport.workflows.fix import fix as fix_fn
    else:
        s.notes.append("fix not measured: tiexport.workflows.fix does not exist yet")

    paths: dict[int, Path] = {}
    nodes: dict[int, int] = {}
    for m in mults:
        fp = float_onnx(lambda m=m: scaled_resnet(m, base_width=width), shape, cfg.work, f"scaled{m}x_w{width}")
        paths[m] = ort_qdq_onnx(fp, num_batches=2)
        nodes[m] = len(onnx.load(str(paths[m])).graph.node)

    funcs: dict[str, Callable[[], object]] = {}
    for m in mults:
        funcs[f"validate {m}x"] = lambda p=paths[m]: validate(str(p))
        if fix_fn is not None:
            funcs[f"fix {m}x"] = lambda p=paths[m], f=fix_fn: f(str(p), device=DEVICE)
    timings = time_callables(funcs, cfg)

    s.body.append(f"Models: scaled_resnet(k, base_width={width}) at {'x'.join(map(str, shape))}, QDQ by ONNX "
                  "Runtime quantize_static (per-channel); k bottleneck blocks per stage, 4 stages. In-process, "
                  f"`validate(path)` (all devices) and `fix(path, device='{DEVICE}')`.")
    s.body.append("")
    head = "| blocks | nodes | file MiB | validate median s | validate min-max s |"
    sep = "|---|---:|---:|---:|---:|"
    if fix_fn is not None:
        head += " fix median s | fix min-max s |"
        sep += "---:|---:|"
    s.body += [head, sep]
    for m in mults:
        v = timings[f"validate {m}x"]
        row = (f"| {m}x ({4 * m}) | {nodes[m]} | {paths[m].stat().st_size / 2**20:.1f} | {v.median:.3f} | "
               f"{v.lo:.3f}-{v.hi:.3f} |")
        if fix_fn is not None:
            f = timings[f"fix {m}x"]
            row += f" {f.median:.3f} | {f.lo:.3f}-{f.hi:.3f} |"
        s.body.append(row)

    lo, hi = mults[0], mults[-1]
    node_ratio = nodes[hi] / nodes[lo]
    s.body += ["", f"| tool | slope ms / 1000 nodes | intercept ms | R^2 | time ratio {hi}x/{lo}x | "
                   f"node ratio {hi}x/{lo}x |", "|---|---:|---:|---:|---:|---:|"]
    for tool in ("validate", "fix"):
        series: list[Timing] = [timings[f"{tool} {m}x"] for m in mults if f"{tool} {m}x" in timings]
        if len(series) != len(mults):
            continue
        xs = [float(nodes[m]) for m in mults]
        ys = [t.median for t in series]
        slope, intercept, r2 = linear_fit(xs, ys)
        ratio = ys[-1] / ys[0]
        s.body.append(f"| {tool} | {slope * 1e6:.2f} | {intercept * 1e3:.1f} | {r2:.4f} | {ratio:.2f} | "
                      f"{node_ratio:.2f} |")
        s.checks.append(at_most(f"{tool} time {hi}x / {lo}x", ratio, 20.0))
    return [s.finish()]


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
