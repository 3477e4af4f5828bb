"""validate against the floor and a peer: ``tiexport validate`` vs ``onnx.load`` vs ``polygraphy check lint``.

Targets (issue 8), on the ResNet-50-size QDQ model: wall time of ``tiexport validate P`` / wall time of
``python -c "import onnx; onnx.load(P)"`` <= 2.0; peak RSS <= 2x the file size + 100 MB; at least 3x faster than
``polygraphy check lint P``. Everything is a subprocess, as a user runs it: interpreter start and imports count.
``tiexport validate`` runs with its default (every device), the case a user without ``--device`` gets.
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
    peer_command,
    render_timings,
    script_main,
    show_commands,
    tiexport_command,
    time_commands,
)

__all__ = ["run"]


def _commands(path: Path, peers: bool, quick: bool) -> tuple[dict[str, list[str]], list[str]]:
    py = sys.executable
    cmds = {
        "onnx.load": [py, "-c", f'import onnx; onnx.load("{path}")'],
        "tiexport validate": [*tiexport_command(), "validate", str(path)],
    }
    if not quick:  # for attribution, not targets: the import alone, and validate for one device
        cmds = {"python -c 'import onnx'": [py, "-c", "import onnx"], **cmds,
                "tiexport validate --device AM68A": [*tiexport_command(), "validate", str(path), "--device", "AM68A"]}
    notes = []
    lint = peer_command("polygraphy", "polygraphy") if peers else None
    if lint:
        cmds["polygraphy check lint"] = [*lint, "check", "lint", str(path)]
    else:
        why = "--no-peers" if not peers else "not installed (pip install -e '.[bench]')"
        notes.append(f"polygraphy not run: {why}")
    return cmds, notes


def run(cfg: Config) -> list[Section]:
    from bench.models import qdq_models

    files, _, notes = qdq_models(cfg.work, cfg.quick)
    sections = []
    for label, path in files.items():
        key = "validate" if label.startswith("ORT") else "validate-tiexport"
        s = Section(key=key, title=f"validate: {'ResNet-50' if not cfg.quick else 'tiny'} QDQ from {label}",
                    command="python bench/bench_validate.py" + (" --quick" if cfg.quick else ""))
        cmds, peer_notes = _commands(path, cfg.peers, cfg.quick)
        # validate exits 1 when it finds errors: still a completed run; polygraphy too when lint finds something
        timings = time_commands(cmds, cfg, ok=(0, 1))
        size = path.stat().st_size
        s.body.append(f"Model: `{path.name}`, {size / 2**20:.1f} MiB, made by {label}.")
        s.body.append("")
        s.body.extend(render_timings(timings, baseline="onnx.load", rss=True))
        s.body.append("")
        s.body.append("Commands:")
        s.body.extend(show_commands(cmds, {"P": path}))
        v, load = timings["tiexport validate"], timings["onnx.load"]
        if v.walls and load.walls:
            s.checks.append(at_most("validate / onnx.load wall time", v.median / load.median, 2.0))
            budget = 2 * size + 100 * 2**20
            s.checks.append(at_most("validate peak RSS, MB (<= 2x file + 100 MB)", v.peak_rss / 2**20,
                                    round(budget / 2**20, 1)))
            lint = timings.get("polygraphy check lint")
            if lint is not None and lint.walls:
                s.checks.append(at_least("polygraphy lint / validate wall time", lint.median / v.median, 3.0))
        else:
            s.status = "failed"
            s.notes.append("a contender failed: " + "; ".join(f"{t.name}: {t.failures[:1]}"
                                                              for t in timings.values() if t.failures))
        s.notes.extend(peer_notes)
        s.notes.extend(notes)
        sections.append(s.finish())
    return sections


if __name__ == "__main__":
    sys.exit(script_main(run, __doc__))
