"""parity against the floor: ``tiexport parity`` vs the bare ONNX Runtime runs it needs.

Target (issue 8): ``tiexport parity Q --reference F --num-samples 8`` on the ResNet-50-size model (Q its QDQ model, F
the float model) <= 1.5x the time of the bare runs: one script that creates both sessions (graph optimisations off,
as the parity default; thread spinning off, as tiexport does, because with two cores an idle session's spinning
threads slow the busy one) and runs 8 seeded random samples through each. Both as subprocesses, so each pays for its
interpreter and imports. ``--per-layer`` is timed beside them for information (it compares every shared tensor).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Config,
    Section,
    at_most,
    have_module,
    render_timings,
    script_main,
    show_commands,
    tiexport_command,
    time_commands,
)

__all__ = ["BARE_ORT", "run"]

SAMPLES = 8

# The floor: what any parity check must do at least (two sessions, N runs each), with nothing compared.
BARE_ORT = """
import sys
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.add_session_config_entry("session.inter_op.allow_spinning", "0")
n = int(sys.argv[3])
for path in sys.argv[1:3]:
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    rng = np.random.default_rng(0)
    for _ in range(n):
        sess.run(None, {inp.name: rng.random(inp.shape, dtype=np.float32)})
    del sess
"""


def run(cfg: Config) -> list[Section]:
    title = f"parity: {'ResNet-50' if not cfg.quick else 'tiny'} QDQ vs float, {SAMPLES} samples"
    command = "python bench/bench_parity.py" + (" --quick" if cfg.quick else "")
    if not have_module("tiexport.parity"):
        s = Section(key="parity", title=title, command=command, status="skipped")
        s.notes.append("not run: tiexport.parity (`tiexport parity`) does not exist yet")
        return [s.finish()]

    from bench.models import qdq_models

    files, fp, notes = qdq_models(cfg.work, cfg.quick)
    q = files["ORT quantize_static"]
    s = Section(key="parity", title=title, command=command)
    tie = tiexport_command()
    cmds = {
        "bare ORT runs": [sys.executable, "-c", BARE_ORT, str(fp), str(q), str(SAMPLES)],
        "tiexport parity": [*tie, "parity", str(q), "--reference", str(fp), "--num-samples", str(SAMPLES)],
    }
    if not cfg.quick:  # for information, not a target
        cmds["tiexport parity --per-layer"] = [*tie, "parity", str(q), "--reference", str(fp), "--num-samples",
                                               str(SAMPLES), "--per-layer"]
    # parity exits 1 when the check fails (quantized vs float may exceed the default tolerance): a completed run
    timings = time_commands(cmds, cfg, ok=(0, 1))
    s.body.append(f"Models: F = `{fp.name}` (float), Q = `{q.name}` (ONNX Runtime quantize_static, per-channel).")
    s.body.append("")
    s.body.extend(render_timings(timings, baseline="bare ORT runs", rss=True))
    s.body.append("")
    s.body.append("Commands:")
    s.body.extend(show_commands({k: v for k, v in cmds.items() if k != "bare ORT runs"}, {"Q": q, "F": fp}))
    s.body.append("- bare ORT runs: `python -c BARE_ORT F Q 8` (BARE_ORT in bench/bench_parity.py)")
    par, base = timings["tiexport parity"], timings["bare ORT runs"]
    if par.walls and base.walls:
        s.checks.append(at_most(f"parity ({SAMPLES} samples) / bare ORT runs wall time", par.median / base.median,
                                1.5))
    else:
        s.status = "failed"
        s.notes.append("a contender failed: " + "; ".join(f"{t.name}: {t.failures[:1]}"
                                                          for t in timings.values() if t.failures))
    s.notes.extend(notes)
    return [s.finish()]


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
