"""fix's peak memory on a 1 GiB external-data model (issue 18, item 12): peak RSS <= 2 x model bytes + 300 MB with
parity on.

Model: ``bench_robustness.build_external_model`` with 64 MatMul layers of int8 [4096, 4096] per-channel weights
(1 GiB in one external-data file, written in chunks, never held in memory). ``tiexport fix`` runs as a subprocess and
its peak RSS is that child's rusage (``bench.common.run_once``):

- ``-d TDA4VM``: per-channel weights become per-tensor (exact here: every channel has the same scale), parity runs on
  one sample in ONNX Runtime, input model against the written output (two sessions, both files' weights mapped);
- ``-d AM68A``: nothing to change but shape annotations: parity by construction, no ONNX Runtime run;
- ``-d TDA4VM --no-parity``;
- ``-d TDA4VM`` on the same weights with per-channel scales that are not powers of two: every weight is requantized
  (per-tensor, power of two), so the whole 1 GiB is rewritten and parity runs on 4 samples.

Target: the TDA4VM run (parity on) within 2 x 1 GiB + 300 MB. ``--quick``: 16 MiB of weights, figures not recorded.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_robustness import build_external_model
from bench.common import Config, Section, at_most, render_timings, script_main, show_commands, tiexport_command
from bench.common import time_commands as _time_commands

__all__ = ["run"]

ALLOWANCE_MB = 300.0


def run(cfg: Config) -> list[Section]:
    s = Section(key="fix-memory", title="fix: peak RSS on a 1 GiB external-data model",
                command="python bench/bench_fix_memory.py" + (" --quick" if cfg.quick else ""))
    hidden, layers = (1024, 16) if cfg.quick else (4096, 64)
    with tempfile.TemporaryDirectory(prefix="tiexport-fixmem-", dir=cfg.work) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        model, size = build_external_model(folder, hidden, layers, "matmul_chain")
        requant = _with_scales(model, folder / "matmul_chain_np2.onnx")
        built = time.perf_counter() - t0
        out = folder / "out"
        out.mkdir()
        commands = {
            "fix -d TDA4VM (parity on)": [*tiexport_command(), "fix", str(model), "-d", "TDA4VM", "-o",
                                          str(out / "tda4vm.onnx")],
            "fix -d AM68A (parity by construction)": [*tiexport_command(), "fix", str(model), "-d", "AM68A", "-o",
                                                      str(out / "am68a.onnx")],
            "fix -d TDA4VM --no-parity": [*tiexport_command(), "fix", str(model), "-d", "TDA4VM", "--no-parity",
                                          "-o", str(out / "tda4vm_noparity.onnx")],
            "fix -d TDA4VM, every weight requantized": [*tiexport_command(), "fix", str(requant), "-d", "TDA4VM",
                                                        "-o", str(out / "tda4vm_requant.onnx")],
        }
        timings = _time_commands(commands, cfg, ok=(0,), timeout=1800)
        written = sorted(p.name for p in out.iterdir())
    limit_mb = 2 * size / 2**20 + ALLOWANCE_MB
    s.body += [f"Model: {layers} x (MatMul [1, {hidden}] x int8 [{hidden}, {hidden}] per-channel DequantizeLinear, "
               f"Relu, Q/DQ), {size / 2**30:.3f} GiB of weights in one external-data file; built in {built:.0f} s. "
               f"Bound: 2 x model bytes + {ALLOWANCE_MB:.0f} MB = {limit_mb:.0f} MB.", ""]
    s.body += render_timings(timings, rss=True)
    s.body += ["", f"Files written: {', '.join(written)}", "", "Commands:",
               *show_commands(commands, {"P": model, "P_np2": requant, "OUT": out})]
    for label, t in timings.items():
        if not t.walls:
            s.status = "failed"
            s.notes.append(f"{label}: did not finish")
    parity_on = timings["fix -d TDA4VM (parity on)"].peak_rss / 2**20
    s.checks.append(at_most("fix -d TDA4VM (parity on) peak RSS, MB", parity_on, limit_mb, " MB"))
    s.checks.append(at_most("fix -d TDA4VM, every weight requantized, peak RSS, MB",
                            timings["fix -d TDA4VM, every weight requantized"].peak_rss / 2**20, limit_mb, " MB"))
    s.checks.append(at_most("fix -d AM68A peak RSS, MB", timings["fix -d AM68A (parity by construction)"].peak_rss
                            / 2**20, limit_mb, " MB"))
    if cfg.quick:
        s.notes.append("quick mode: a 16 MiB model, so the figures say little")
    return [s.finish()]


def _with_scales(model: Path, out: Path) -> Path:
    """``model`` with each weight's per-channel scales spread over non-powers of two (same data file)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model), load_external_data=False)
    for t in m.graph.initializer:
        if t.name.startswith("w") and t.name.endswith("_scale"):
            n = int(t.dims[0])
            t.CopyFrom(numpy_helper.from_array(np.linspace(0.0007, 0.0013, n, dtype=np.float32), t.name))
    out.write_bytes(m.SerializeToString())
    return out


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
