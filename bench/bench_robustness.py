"""Robustness at scale (issue 9): the long fuzz run over all four entry points, and validate's peak RSS on a 1 GB
external-data model. ``python bench/bench_robustness.py`` (``--quick``: a 16 MB model and a few cases, nothing
recorded).

Fuzz: the mutations of ``fixtures/malformed.py`` (field-level, byte-level, Q/DQ parameters) of the committed
fixtures, through ``validate``, ``fix``, ``check_parity`` (original vs mutant) and ``snippet``, in worker processes of
a few hundred cases each, so that a native abort (onnx or ONNX Runtime C++ asserting) is counted, its input kept,
and the run goes on after it. Case ``i`` of an entry point is fully determined by (seed, entry, i). Counted per
entry point: results, one-line TiexportErrors by type, and the failures -- a Python traceback (any other exception),
a multi-line error, a rule crash (TIDL000), a fix output that fails the full onnx.checker or an ONNX Runtime
session, a changed input, a native abort. The CI-size version is ``tests/robustness/test_fuzz.py``.

RSS: a QDQ MatMul chain whose int8 weights (4 x 16384 x 16384, 1 GiB) live in one external-data file, written in
chunks (never held in memory); ``tiexport validate`` of it runs as a subprocess and its peak RSS is read from the
rusage of that child (``bench.common.run_once``: a bare launcher forks it and reads ``os.wait4``, i.e. the
RUSAGE_CHILDREN figure of a process with exactly one child). Target: < 300 MB. For contrast: the same graph with
256 KiB of weights, and ``onnx.load`` of the 1 GiB model (which reads the weights).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REPO_ROOT,
    Check,
    Config,
    Section,
    at_most,
    render_timings,
    script_main,
    show_commands,
    tiexport_command,
    time_commands,
)

__all__ = ["build_external_model", "run"]

log = logging.getLogger("bench.robustness")

ENTRIES = ("validate", "fix", "parity", "snippet")
CASES_FULL = {"validate": 20000, "fix": 6000, "parity": 8000, "snippet": 8000}
CASES_QUICK = {"validate": 40, "fix": 20, "parity": 20, "snippet": 20}
CHUNK = 400
SEED = 9
DEVICES = ("TDA4VM", "AM68A", "AM62")
FORMATS = ("benchmark", "tidl", "tidl-json", "yaml")
FAILURES = ("traceback", "multi-line error", "rule crash (TIDL000)", "broken fix output", "input changed",
            "native abort")
RSS_TARGET_MB = 300.0
WORKER_MEMORY = 6 * 2**30
"""Address space of a fuzz worker."""


# ================================================================================================= fuzz worker
def _case(entry: str, i: int, seed: int, blobs: list[bytes], models: list[Any]) -> tuple[bytes, bytes, Any]:
    """(original, mutant bytes, mutant ModelProto or None) of case ``i``; the same on every run."""
    from fixtures.malformed import mutate_bytes, mutate_model, mutate_qparams

    rng = random.Random(f"{seed}-{entry}-{i}")
    k = rng.randrange(len(blobs))
    kind = i % 3
    if kind == 0:
        mutant = mutate_model(models[k], rng.randrange)
    elif kind == 1:
        mutant = mutate_bytes(blobs[k], rng.randrange)
    else:
        mutant = mutate_qparams(models[k], rng.randrange).SerializeToString()
    return blobs[k], mutant, kind


def _loadable_problem(model: Any) -> str:
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model, full_check=True)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return ""


def _run_case(entry: str, i: int, original: bytes, mutant: bytes) -> tuple[str, str]:
    """(outcome, detail) of one call; outcome is 'result', a TiexportError class name, or one of FAILURES."""
    import onnx

    import tiexport
    from tiexport.errors import TiexportError

    device = DEVICES[i % len(DEVICES)]
    proto = None
    try:
        if entry == "validate":
            report = tiexport.validate(mutant, "all")
            crashed = [f.message for f in report.findings if f.rule_id == "TIDL000"]
            return ("rule crash (TIDL000)", crashed[0]) if crashed else ("result", "")
        if entry == "fix":
            proto = onnx.ModelProto()
            try:
                proto.ParseFromString(mutant)
                before = proto.SerializeToString()
            except Exception:
                proto, before = None, b""
            try:
                fixed, _ = tiexport.fix(proto if proto is not None else mutant, device, num_samples=1)
            except TiexportError:
                if proto is not None and proto.SerializeToString() != before:
                    return "input changed", ""
                raise
            if proto is not None and proto.SerializeToString() != before:
                return "input changed", ""
            problem = _loadable_problem(fixed)
            return ("broken fix output", problem) if problem else ("result", "")
        if entry == "parity":
            tiexport.check_parity(original, mutant, num_samples=1)
            return "result", ""
        text = tiexport.snippet(mutant, device, FORMATS[i % len(FORMATS)])
        return ("result", "") if text.strip() else ("traceback", "empty snippet")
    except TiexportError as exc:
        if not str(exc) or "\n" in str(exc):
            return "multi-line error", str(exc)[:300]
        return type(exc).__name__, ""
    except Exception as exc:  # a traceback would reach the user
        return "traceback", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _fixture_models() -> tuple[list[bytes], list[Any]]:
    import onnx

    fixtures = sorted((REPO_ROOT / "fixtures" / "models").glob("*.onnx"))
    blobs = [p.read_bytes() for p in fixtures if p.stat().st_size < 64_000]
    return blobs, [onnx.load_model_from_string(b) for b in blobs]


def fuzz_worker(entry: str, seed: int, start: int, stop: int, state: Path) -> None:
    """Run cases [start, stop) of ``entry``. Before each case the counts so far and the case's index go to ``state``
    (JSON), so that the parent knows where a worker that died in native code stopped, and what it had counted."""

    logging.disable(logging.CRITICAL)
    import resource

    # a case that would exhaust memory fails as a MemoryError (a finding of this run), not the machine
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.CRITICAL + 1  # its warnings go to stdout, which nobody reads here
    blobs, models = _fixture_models()
    counts: collections.Counter[str] = collections.Counter()
    examples: list[dict[str, Any]] = []
    for i in range(start, stop):
        state.write_text(json.dumps({"running": i, "counts": counts, "examples": examples}))
        original, mutant, kind = _case(entry, i, seed, blobs, models)
        outcome, detail = _run_case(entry, i, original, mutant)
        counts[outcome] += 1
        if outcome in FAILURES and len(examples) < 10:
            examples.append({"case": i, "kind": kind, "outcome": outcome, "detail": detail})
    state.write_text(json.dumps({"running": None, "counts": counts, "examples": examples}))


def _fuzz(entry: str, n: int, seed: int, keep: Path) -> tuple[collections.Counter[str], list[dict[str, Any]], float]:
    """All ``n`` cases of ``entry`` in worker processes of CHUNK cases; a case that kills its worker is counted as a
    native abort, its input saved to ``keep``, and the next worker starts after it."""
    counts: collections.Counter[str] = collections.Counter()
    examples: list[dict[str, Any]] = []
    started = time.perf_counter()
    i = 0
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.json"
        while i < n:
            stop = min(n, i + CHUNK)
            state.write_text(json.dumps({"running": i, "counts": {}, "examples": []}))
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fuzz-worker", entry, str(seed),
                                   str(i), str(stop), str(state)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=3600)
            doc = json.loads(state.read_text())
            counts.update(doc["counts"])
            examples.extend(doc["examples"])
            if proc.returncode == 0 and doc["running"] is None:
                i = stop
                continue
            at = int(doc["running"])
            saved = keep / f"abort_{entry}_{seed}_{at}.onnx"
            blobs, models = _fixture_models()
            saved.write_bytes(_case(entry, at, seed, blobs, models)[1])
            last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
            counts["native abort"] += 1
            examples.append({"case": at, "outcome": "native abort", "detail": f"exit {proc.returncode}: {last}",
                             "saved": str(saved)})
            i = at + 1
    return counts, examples, time.perf_counter() - started


# ================================================================================================= 1 GB model
def build_external_model(folder: Path, hidden: int, layers: int, name: str) -> tuple[Path, int]:
    """input -> Q/DQ -> layers x (MatMul with an int8 per-channel weight DequantizeLinear -> Relu -> Q/DQ) -> output.

    Every weight (``hidden x hidden`` int8) is stored in ``<name>.onnx.data``, written chunk by chunk. Returns the
    model path and the external-data size in bytes.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = folder / f"{name}.onnx"
    data_name = f"{path.name}.data"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(value: Any, tname: str) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), tname))
        return tname

    def qdq(x: str, tag: str, scale: float) -> str:
        s, z = const(np.float32(scale), f"{tag}_scale"), const(np.uint8(0), f"{tag}_zero_point")
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{tag}_q"], name=f"{tag}_QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"],
                                      name=f"{tag}_DequantizeLinear"))
        return f"{tag}_dq"

    x = qdq("input", "input", 2.0**-8)
    offset = 0
    chunk = 1 << 24
    with open(folder / data_name, "wb") as f:
        for layer in range(layers):
            rng = np.random.default_rng(layer)
            size = hidden * hidden
            left = size
            while left:
                n = min(chunk, left)
                f.write(rng.integers(-127, 128, size=n, dtype=np.int8).tobytes())
                left -= n
            w = onnx.TensorProto(name=f"w{layer}_quantized", data_type=TensorProto.INT8, dims=[hidden, hidden])
            w.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(size))):
                w.external_data.add(key=key, value=value)
            inits.append(w)
            offset += size
            scale = const(np.full(hidden, 2.0**-10, np.float32), f"w{layer}_scale")
            zp = const(np.zeros(hidden, np.int8), f"w{layer}_zero_point")
            nodes.append(helper.make_node("DequantizeLinear", [w.name, scale, zp], [f"w{layer}_dq"], axis=1,
                                          name=f"w{layer}_DequantizeLinear"))
            nodes.append(helper.make_node("MatMul", [x, f"w{layer}_dq"], [f"mm{layer}"], name=f"matmul{layer}"))
            nodes.append(helper.make_node("Relu", [f"mm{layer}"], [f"relu{layer}"], name=f"relu{layer}"))
            x = qdq(f"relu{layer}", f"relu{layer}", 2.0**-4)
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, hidden])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_robustness")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path, offset


# ================================================================================================= sections
def _fuzz_part(cfg: Config, s: Section) -> None:
    cases = CASES_QUICK if cfg.quick else CASES_FULL
    keep = cfg.work / "robustness"
    keep.mkdir(parents=True, exist_ok=True)
    s.body += ["", "### Long fuzz run, all four entry points", "",
               f"Seed {SEED}; case i of an entry point is a field-level (i % 3 == 0), byte-level (1) or Q/DQ-parameter "
               "(2) mutation of a committed fixture (`fixtures/malformed.py`); fix runs for TDA4VM/AM68A/AM62 in "
               "turn, snippet in every format in turn; parity compares the mutant with its original.", "",
               "| entry point | cases | seconds | results | one-line errors | " + " | ".join(FAILURES) + " |",
               "|---|---:|---:|---:|---|" + "---:|" * len(FAILURES)]
    failed = 0
    all_examples = []
    for entry in ENTRIES:
        log.info("fuzz %s: %d cases", entry, cases[entry])
        counts, examples, seconds = _fuzz(entry, cases[entry], SEED, keep)
        errors = {k: v for k, v in sorted(counts.items()) if k not in FAILURES and k != "result"}
        shown = ", ".join(f"{k} {v}" for k, v in errors.items()) or "-"
        bad = [counts.get(f, 0) for f in FAILURES]
        failed += sum(bad)
        s.body.append(f"| {entry} | {sum(counts.values())} | {seconds:.1f} | {counts.get('result', 0)} | {shown} | "
                      + " | ".join(str(b) for b in bad) + " |")
        all_examples += [{"entry": entry, **e} for e in examples]
    if all_examples:
        s.notes.append("failures (first of each entry point): " + "; ".join(
            f"{e['entry']} case {e['case']}: {e['outcome']} {e.get('detail', '')}".strip() for e in all_examples[:8]))
    # at_most() divides by the limit; zero failures is an exact target
    s.checks.append(Check("fuzz: tracebacks, aborts, rule crashes, broken outputs, changed inputs", failed, "= 0",
                          failed == 0, "-" if failed == 0 else f"{failed} failure(s)"))
    if failed:
        s.status = "failed"


def _rss_part(cfg: Config, s: Section) -> None:
    hidden, layers = (2048, 4) if cfg.quick else (16384, 4)
    s.body += [f"### validate peak RSS on a {'16 MB (quick)' if cfg.quick else '1 GB'} external-data model", ""]
    with tempfile.TemporaryDirectory(prefix="tiexport-rss-", dir=cfg.work) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        log.info("writing the %d x %d x %d int8 external-data model", layers, hidden, hidden)
        big, size = build_external_model(folder, hidden, layers, "matmul_chain_external")
        small, small_size = build_external_model(folder, 256, layers, "matmul_chain_small")
        built = time.perf_counter() - t0
        py = sys.executable
        commands = {
            "tiexport validate (big)": [*tiexport_command(), "validate", str(big)],
            "tiexport validate -d AM68A (big)": [*tiexport_command(), "validate", str(big), "--device", "AM68A"],
            "tiexport validate (same graph, small weights)": [*tiexport_command(), "validate", str(small)],
            "onnx.load (big, reads the weights)": [py, "-c", f'import onnx; onnx.load("{big}")'],
        }
        timings = time_commands(commands, cfg, ok=(0, 1), timeout=1800)
        s.body += [f"Model: {layers} x (MatMul [1, {hidden}] x int8 [{hidden}, {hidden}] per-channel DequantizeLinear, "
                   f"Relu, Q/DQ), {size / 2**30:.3f} GiB of weights in one external-data file "
                   f"(`{big.name}.data`), model file {big.stat().st_size / 1024:.0f} KiB; built in {built:.0f} s. "
                   f"Small: the same graph with {small_size / 2**20:.2f} MiB of weights.", ""]
        s.body += render_timings(timings, rss=True)
        s.body += ["", "Commands:", *show_commands(commands, {"P_big": big, "P_small": small})]
    peak = timings["tiexport validate (big)"].peak_rss / 2**20
    peak_one = timings["tiexport validate -d AM68A (big)"].peak_rss / 2**20
    if not timings["tiexport validate (big)"].walls:
        s.status = "failed"
    s.checks.append(at_most("validate peak RSS, MB (all devices)", peak, RSS_TARGET_MB, " MB"))
    s.checks.append(at_most("validate --device AM68A peak RSS, MB", peak_one, RSS_TARGET_MB, " MB"))
    if cfg.quick:
        s.notes.append("quick mode: a 16 MB model and a few fuzz cases, so neither figure says much")


def run(cfg: Config) -> list[Section]:
    s = Section(key="robustness", title="Robustness",
                command="python bench/bench_robustness.py" + (" --quick" if cfg.quick else ""))
    s.body.append("Issue 9. CI-size versions: `tests/robustness/` (catalogue, fuzz, threads).")
    s.body.append("")
    _rss_part(cfg, s)
    _fuzz_part(cfg, s)
    return [s.finish()]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fuzz-worker":
        entry, seed, start, stop, state = sys.argv[2:7]
        fuzz_worker(entry, int(seed), int(start), int(stop), Path(state))
        os._exit(0)  # skip interpreter teardown: ONNX Runtime's thread pools make it slow
    sys.exit(script_main(run, __doc__))
