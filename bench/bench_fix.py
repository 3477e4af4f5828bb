"""fix against the floor and a peer: ``tiexport fix --device AM68A`` vs ``onnx.load`` + ``onnx.save`` vs ``onnxslim``.

Targets (issue 8), on the ResNet-50-size QDQ model: wall time of ``tiexport fix P -o OUT --device AM68A`` / wall time
of ``python -c "import onnx; onnx.save(onnx.load(P), OUT)"`` <= 3.0; faster than ``onnxslim P OUT``. All subprocesses,
as a user runs them. ``fix`` does more than the others: it runs onnx.checker and an ONNX Runtime load check on OUT,
validates P and OUT, and establishes OUT's parity with P: by comparing nodes and weights when no rewrite touched them
(the case for this model on AM68A: only shape annotations are added), else by running both in ONNX Runtime. The
``--device TDA4VM`` row (not a target) shows the second case: per-tensor power-of-2 rewrites, parity on 4 samples.
The section lists each output's node count.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Config,
    Section,
    at_least,
    at_most,
    have_module,
    peer_command,
    render_timings,
    script_main,
    show_commands,
    tiexport_command,
    time_commands,
)

__all__ = ["run"]

DEVICE = "AM68A"


def _node_count(path: Path) -> str:
    import onnx

    if not path.exists():
        return "-"
    return str(len(onnx.load(str(path), load_external_data=False).graph.node))


def run(cfg: Config) -> list[Section]:
    title = "fix: {} QDQ from {}"
    if not have_module("tiexport.workflows.fix"):
        s = Section(key="fix", title=title.format("ResNet-50" if not cfg.quick else "tiny", "ORT quantize_static"),
                    command="python bench/bench_fix.py", status="skipped")
        s.notes.append("not run: tiexport.workflows.fix (`tiexport fix`) does not exist yet")
        return [s.finish()]

    from bench.models import qdq_models

    files, _, notes = qdq_models(cfg.work, cfg.quick)
    sections = []
    py = sys.executable
    for label, path in files.items():
        key = "fix" if label.startswith("ORT") else "fix-tiexport"
        s = Section(key=key, title=title.format("ResNet-50" if not cfg.quick else "tiny", label),
                    command="python bench/bench_fix.py" + (" --quick" if cfg.quick else ""))
        outs = {k: cfg.work / f"{path.stem}.{k}.onnx" for k in ("saved", "fixed", "slim", "tda4vm")}
        cmds = {
            "onnx load+save": [py, "-c", f'import onnx; onnx.save(onnx.load("{path}"), "{outs["saved"]}")'],
            f"tiexport fix --device {DEVICE}": [*tiexport_command(), "fix", str(path), "-o", str(outs["fixed"]),
                                                "--device", DEVICE],
        }
        # for attribution, not targets: the same fix without its parity step, and a fix that changes numerics
        # (TDA4VM: per-tensor power-of-2), whose parity runs both models on 4 samples
        if not cfg.quick:
            cmds[f"tiexport fix --device {DEVICE} --no-parity"] = [*tiexport_command(), "fix", str(path), "-o",
                                                                   str(outs["fixed"]), "--device", DEVICE,
                                                                   "--no-parity"]
            cmds["tiexport fix --device TDA4VM"] = [*tiexport_command(), "fix", str(path), "-o",
                                                    str(outs["tda4vm"]), "--device", "TDA4VM"]
        slim = peer_command("onnxslim", "onnxslim") if cfg.peers else None
        if slim:
            cmds["onnxslim"] = [*slim, str(path), str(outs["slim"])]
        else:
            s.notes.append("onnxslim not run: " + ("--no-peers" if not cfg.peers else
                                                   "not installed (pip install -e '.[bench]')"))
        # fix exits 1 when it wrote OUT but errors remain for the device: a completed run
        timings = time_commands(cmds, cfg, ok=(0, 1))
        s.body.append(f"Model: `{path.name}`, {path.stat().st_size / 2**20:.1f} MiB, {_node_count(path)} nodes, "
                      f"made by {label}.")
        s.body.append("")
        s.body.extend(render_timings(timings, baseline="onnx load+save", rss=True))
        s.body.append("")
        s.body.append("Output node counts: " + ", ".join(
            f"{n} {_node_count(outs[k])}" for n, k in (("load+save", "saved"), ("fix", "fixed"), ("onnxslim", "slim"))
            if n != "onnxslim" or slim))
        s.body.append("")
        s.body.append("Commands:")
        s.body.extend(show_commands(cmds, {"P": path, "OUT1": outs["saved"], "OUT2": outs["fixed"],
                                           "OUT3": outs["slim"], "OUT4": outs["tda4vm"]}))
        fix, base = timings[f"tiexport fix --device {DEVICE}"], timings["onnx load+save"]
        if fix.walls and base.walls:
            s.checks.append(at_most("fix / (onnx load + save) wall time", fix.median / base.median, 3.0))
            sl = timings.get("onnxslim")
            if sl is not None and sl.walls:
                s.checks.append(at_least("onnxslim / fix wall time (fix faster: > 1)", sl.median / fix.median, 1.0))
        else:
            s.status = "failed"
            s.notes.append("a contender failed: " + "; ".join(f"{t.name}: {t.failures[:1]}"
                                                              for t in timings.values() if t.failures))
        s.notes.extend(notes)
        sections.append(s.finish())
    return sections


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
