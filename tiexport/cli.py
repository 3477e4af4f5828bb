"""The ``tiexport`` command: thin subcommands over library calls.

Exit codes (every subcommand): 0 success / nothing at or above ``--fail-on``; 1 the check failed (findings,
parity); 2 unusable input or usage error, reported as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from tiexport import __version__
from tiexport.errors import TiexportError, UsageError, first_line
from tiexport.limits import LimitExceeded
from tiexport.terminal import safe_text

__all__ = ["main"]

log = logging.getLogger("tiexport")

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _add_sdk_option(p: argparse.ArgumentParser) -> None:
    from tiexport.tidl_spec import DEFAULT_SDK, SDK_VERSIONS

    p.add_argument("--sdk", choices=SDK_VERSIONS, default=None, metavar="VERSION",
                   help=f"TIDL SDK release to check against: {', '.join(SDK_VERSIONS)} (default: {DEFAULT_SDK}, the "
                        "latest tiexport knows); operator tables and constraints differ between releases")


def _add_output_options(p: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    p.add_argument("--format", choices=formats, default=formats[0], help="report format (default: %(default)s)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE instead of stdout")


def _add_time_limit(p: argparse.ArgumentParser, what: str) -> None:
    from tiexport.limits import DEFAULT_TIME_LIMIT

    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="SECONDS",
                   help=f"stop {what} after this many seconds, with nothing written (exit 2); a graph that never "
                        "ends (a Loop of 2**62 trips) is stopped inside ONNX Runtime (default: %(default)g; 0: no "
                        "limit)")


def _emit(text: str, output: str | None, protect: tuple[str, ...] = ()) -> None:
    """Print (or write) a report. Control characters from the model are escaped (:func:`safe_text`): JSON, SARIF and
    the generated snippets already escape them, the text reports would pass them to the terminal."""
    text = safe_text(text)
    if output:
        from tiexport.onnx_io import write_text

        write_text(output, text, protect=protect)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(safe_text(text if text.endswith("\n") else text + "\n"))


# ------------------------------------------------------------------------------------------------- validate
def _validate_paths(models: list[str]) -> list[str]:
    """The model arguments, a folder standing for the .onnx files in it (sorted)."""
    paths: list[str] = []
    for model in models:
        if os.path.isdir(model):
            found = sorted(os.path.join(model, n) for n in os.listdir(model) if n.endswith(".onnx"))
            if not found:
                raise UsageError(f"{model}: is a directory with no .onnx file in it")
            paths.extend(found)
        else:
            paths.append(model)
    return paths


#: nodes listed per rule and device in validate's text output without --verbose
TEXT_MAX_NODES = 5


def _cmd_validate(args: argparse.Namespace) -> int:
    from tiexport.terminal import use_colour
    from tiexport.validators.registry import rule_titles
    from tiexport.validators.report import Report, render, render_many
    from tiexport.validators.validate import validate

    devices = args.device or ["all"]
    paths = _validate_paths(args.model)
    colour = args.output is None and use_colour(sys.stdout)
    if len(paths) == 1:
        report = validate(paths[0], device=devices, sdk=args.sdk)
        _emit(render(report, args.format, colour=colour, rule_titles=rule_titles(),
                     max_nodes=None if args.verbose else TEXT_MAX_NODES), args.output, (paths[0],))
        return report.exit_code(args.fail_on)
    # several models (a CI job over a folder): one summary line per model and device, one exit code for all
    reports: list[Report] = []
    failed: dict[str, str] = {}
    for path in paths:
        try:
            reports.append(validate(path, device=devices, sdk=args.sdk))
        except (UsageError, TiexportError) as exc:
            failed[path] = first_line(exc)
    if args.verbose and args.format == "text":
        text = "\n".join(r.to_text(colour, rule_titles()) for r in reports)
        text += render_many([], "text", colour, failed=failed) if failed else ""
    else:
        text = render_many(reports, args.format, colour, rule_titles(), failed)
    _emit(text, args.output, tuple(paths))
    if failed:
        return 2
    return max((r.exit_code(args.fail_on) for r in reports), default=0)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check QDQ ONNX models against TIDL's prequantized-import rules",
                       description="Check QDQ ONNX models against TIDL's prequantized-import rules, per device. "
                       "Several models (or a folder of them): one summary line each, one exit code for all.")
    p.add_argument("model", nargs="+", help="the .onnx file(s), or a folder of them")
    p.add_argument("--device", "-d", action="append", metavar="NAME",
                   help="TDA4VM, AM62A, AM67A, AM68A, AM69A, AM62 or 'all' (repeatable; default all)")
    _add_sdk_option(p)
    _add_output_options(p, ("text", "json", "sarif"))
    p.add_argument("--fail-on", choices=("error", "warning", "never"), default="error",
                   help="exit 1 when a finding of this severity or worse exists (default: %(default)s)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help=f"text: list every node of each rule (default: the first {TEXT_MAX_NODES}); several "
                   "models: each model's full report instead of its summary lines")
    p.set_defaults(handler=_cmd_validate)


# ------------------------------------------------------------------------------------------------- rules
def _cmd_rules(args: argparse.Namespace) -> int:
    import json

    from tiexport.devices import DEVICES
    from tiexport.validators.registry import RULES

    rows = []
    for rule in RULES:
        doc = (type(rule).__doc__ or "").strip()
        rows.append({
            "rule_id": rule.id, "category": rule.category, "severity": rule.severity, "title": rule.title,
            "devices": [name for name, p in DEVICES.items() if rule.applies_to(p)],
            "sources": list(rule.sources), "advice": rule.advice_parts or ("" if rule.sources else "every check"),
            "doc": " ".join(doc.split()) if args.verbose_docs else "",
        })
    if args.format == "json":
        _emit(json.dumps(rows, indent=2), None)
        return 0
    lines = []
    for r in rows:
        devices = "all" if len(r["devices"]) == len(DEVICES) else ",".join(r["devices"])
        lines.append(f"{r['rule_id']}  {r['category']:<18} {r['severity']:<8} {r['title']}  [{devices}]")
        for cite in r["sources"]:
            lines.append(f"    source: {cite}")
        if r["advice"]:
            lines.append(f"    tiexport advice (no TI source, warnings at most): {r['advice']}")
        if r["doc"]:
            lines.append(f"    {r['doc']}")
    _emit("\n".join(lines), None)
    return 0


def _add_rules(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="list the validator rules: id, category, default severity, title, devices")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--docs", dest="verbose_docs", action="store_true", help="include each rule's what/why/fix")
    p.set_defaults(handler=_cmd_rules)


# ------------------------------------------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from tiexport.context import ModelContext
    from tiexport.onnx_io import as_model

    ctx = ModelContext(as_model(args.model))
    ops: dict[str, int] = {}
    for n in ctx.nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    info: dict[str, object] = {
        "model": ctx.name,
        "ir_version": ctx.model.ir_version,
        "opset": ctx.opset,
        "producer": f"{ctx.model.producer_name} {ctx.model.producer_version}".strip(),
        "inputs": {vi.name: list(ctx.shape(vi.name) or ()) for vi in ctx.graph_inputs},
        "outputs": {o.name: list(ctx.shape(o.name) or ()) for o in ctx.graph.output},
        "nodes": len(ctx.nodes),
        "initializers": len(ctx.initializers),
        "quantized": ctx.is_quantized,
    }
    op_types = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    info["op_types"] = op_types
    if args.format == "json":
        _emit(json.dumps(info, indent=2), None)
    else:
        lines = [f"{k}: {v}" for k, v in info.items() if k != "op_types"]
        lines.append("op_types: " + ", ".join(f"{k} {v}" for k, v in op_types.items()))
        _emit("\n".join(lines), None)
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarize a model: inputs, outputs, opset, op counts")
    p.add_argument("model")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=_cmd_info)


# ------------------------------------------------------------------------------------------------- snippet
def _parse_metrics(items: list[str] | None) -> dict[str, float | str] | None:
    """``KEY=VALUE`` pairs; numeric values become floats (``accuracy_top1%=72.4``)."""
    if not items:
        return None
    out: dict[str, float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--metric expects KEY=VALUE (e.g. accuracy_top1%=72.4), got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def _cmd_snippet(args: argparse.Namespace) -> int:
    from tiexport.snippets import IncompatibleModelError, snippet

    try:
        text = snippet(args.model, args.device, args.format, task=args.task, model_path=args.model_path,
                       metrics=_parse_metrics(args.metric), tidl_tools_path=args.tidl_tools_path,
                       artifacts_folder=args.artifacts_folder, sdk=args.sdk, benchmark_version=args.benchmark_version,
                       deny_layer_types=args.deny_layer_type, deny_layer_names=args.deny_layer_name,
                       meta_arch_type=args.meta_arch_type, meta_layers_names_list=args.meta_layers_names_list,
                       c7x_firmware_version=args.c7x_firmware_version)
    except IncompatibleModelError as exc:
        # the findings go to stderr: stdout is where the snippet would have gone (often a file or a pipe)
        _err(exc.report.to_text(colour=False))
        _err(f"tiexport: {exc}")
        return 1
    _emit(text, args.output, (args.model,))
    if args.format == "tidl-json" and args.tidl_tools_path is None:
        _err(f"tiexport: note: tidl_tools_path is the literal $TIDL_TOOLS_PATH; expand it (envsubst) to the tidl_tools "
             f"built for {args.device} before use")
    return 0


def _add_snippet(sub: argparse._SubParsersAction) -> None:
    from tiexport.snippets import BENCHMARK_VERSIONS, FORMATS, TASKS

    p = sub.add_parser(
        "snippet", help="generate edgeai-benchmark / TIDL delegate / model-zoo / tidlrunner config from the model",
        description="Generate deployment config for a validated QDQ model: an edgeai-benchmark config entry "
                    "(benchmark), TIDL ONNX Runtime delegate options as Python (tidl) or JSON (tidl-json), an "
                    "edgeai-benchmark / model-zoo YAML (yaml) or an edgeai-tidlrunner config (tidlrunner). Options "
                    "and input normalization are derived from the model and agree across formats for the chosen "
                    "edgeai-benchmark release. Exit 1 when the model is not compatible with the device (findings on "
                    "stderr).")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--device", "-d", required=True, metavar="NAME",
                   help="TDA4VM, AM62A, AM67A, AM68A, AM69A or AM62 (aliases accepted)")
    _add_sdk_option(p)
    p.add_argument("--benchmark-version", metavar="V",
                   help=f"edgeai-benchmark release to write for: {', '.join(BENCHMARK_VERSIONS)}, 10.x or 11.x "
                        "(default: the one released with --sdk)")
    p.add_argument("--format", "-f", choices=FORMATS, default="benchmark",
                   help="snippet kind (default: %(default)s)")
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="pre/post-processing, dataset and metric key (default: %(default)s)")
    p.add_argument("--model-path", metavar="P",
                   help="model path written into the snippet (default: MODEL's absolute path)")
    p.add_argument("--metric", action="append", metavar="KEY=VALUE",
                   help="model_info.metric_reference entry, e.g. accuracy_top1%%=72.4 (repeatable)")
    p.add_argument("--artifacts-folder", metavar="DIR",
                   help="TIDL artifacts folder (default: artifacts/<model>_<device>)")
    p.add_argument("--tidl-tools-path", metavar="DIR",
                   help="tidl_tools path for tidl/tidl-json (default: $TIDL_TOOLS_PATH)")
    p.add_argument("--deny-layer-type", action="append", metavar="OP",
                   help="keep this ONNX op type off TIDL (deny_list:layer_type; repeatable or comma-separated)")
    p.add_argument("--deny-layer-name", action="append", metavar="NAME",
                   help="keep this layer (its output(0) name) off TIDL (deny_list:layer_name; repeatable)")
    p.add_argument("--meta-arch-type", type=int, metavar="N",
                   help="detection: TIDL's object_detection:meta_arch_type (3 SSD, 4 YOLOv3, 5 RetinaNet/EfficientDet, "
                        "6 YOLOX/v5/v7, 7 PointPillars, 8 YOLOv8); needs --meta-layers-names-list")
    p.add_argument("--meta-layers-names-list", metavar="PROTOTXT",
                   help="detection: the meta-architecture prototxt (object_detection:meta_layers_names_list)")
    p.add_argument("--c7x-firmware-version", metavar="XX_YY_ZZ_WW",
                   help="advanced_options:c7x_firmware_version for a firmware patch of the --sdk release line "
                        "(SDK 10.0 on), e.g. 10_01_04_00")
    p.add_argument("--output", "-o", metavar="FILE", help="write the snippet to FILE instead of stdout")
    p.set_defaults(handler=_cmd_snippet)


# ------------------------------------------------------------------------------------------------- parity
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pt2", ".safetensors")


def _cmd_parity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tiexport.parity import check_parity
    from tiexport.progress import ProgressBar
    from tiexport.terminal import use_colour

    if Path(args.reference).suffix.lower() in _TORCH_SUFFIXES:
        raise UsageError(f"{args.reference}: the command line takes an .onnx reference; compare against a torch "
                         "module from Python: tiexport.check_parity(module, 'candidate.onnx')")
    with ProgressBar("parity", stream=sys.stderr) as bar:
        report = check_parity(args.reference, args.candidate, inputs=args.inputs, num_samples=args.num_samples,
                            seed=args.seed, atol=args.atol, rtol=args.rtol, max_lsb=args.max_lsb,
                            per_layer=args.per_layer, ort_optimizations=args.ort_optimizations, progress=bar,
                            time_limit=args.time_limit)
    if args.format == "json":
        text = report.to_json()
    else:
        text = report.to_text(colour=args.output is None and use_colour(sys.stdout))
    _emit(text, args.output, (args.candidate, args.reference, *((args.inputs,) if args.inputs else ())))
    return 0 if report.passed else 1


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity", help="compare a QDQ ONNX model against a reference ONNX model in ONNX Runtime",
        description="Run the same inputs through CANDIDATE and REF in ONNX Runtime (graph optimizations off) and "
                    "compare every output, and with --per-layer every tensor both share, naming the first that "
                    "diverges. By default a quantized tensor passes within --max-lsb steps of its own quantization "
                    "on >= 99.9% of elements, a float tensor within atol 1e-5 + rtol 1e-4; --atol/--rtol apply to "
                    "every tensor instead. Exit 0 pass, 1 fail, 2 unusable input.")
    p.add_argument("candidate", metavar="CANDIDATE", help="the .onnx model to check")
    p.add_argument("--reference", "-r", required=True, metavar="REF", help="the reference .onnx model")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="input data, keys = input names (a leading axis of N samples allowed); default: seeded "
                        "random data from the input shapes")
    p.add_argument("--num-samples", "-n", type=int, default=8, metavar="N",
                   help="random samples when no --inputs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random-data seed (default: %(default)s)")
    p.add_argument("--atol", type=float, metavar="A", help="absolute tolerance for every tensor (rtol 0 unless given)")
    p.add_argument("--rtol", type=float, metavar="R", help="relative tolerance for every tensor (atol 0 unless given)")
    p.add_argument("--max-lsb", type=float, default=1.0, metavar="L",
                   help="quantization steps allowed on quantized tensors (default: %(default)s)")
    p.add_argument("--per-layer", action="store_true", help="also compare intermediate tensors shared by name")
    p.add_argument("--ort-optimizations", action="store_true",
                   help="enable ONNX Runtime graph optimizations (off by default, as TI recommends for QDQ models)")
    _add_time_limit(p, "the comparison")
    _add_output_options(p, ("text", "json"))
    p.set_defaults(handler=_cmd_parity)


# ------------------------------------------------------------------------------------------------- fix
def _cmd_fix(args: argparse.Namespace) -> int:
    import json

    from tiexport.onnx_io import check_output, same_file
    from tiexport.passes.static_shapes import parse_input_shape
    from tiexport.workflows.fix import fix

    out = args.output or (args.model if args.in_place else None)
    if out is None:
        raise UsageError("fix: -o OUT is required (or --in-place to rewrite MODEL itself)")
    overwrite_input = same_file(out, args.model)
    if overwrite_input and not args.in_place:
        raise UsageError(f"{out}: is the input model; refusing to overwrite it (write elsewhere, or pass --in-place)")
    if args.inputs and same_file(out, args.inputs):
        raise UsageError(f"{out}: is the --inputs file; refusing to overwrite it")
    # before any work: OUT must be a plain file that is neither the input nor data the input reads
    check_output(out, () if overwrite_input else (args.model,))
    shapes: dict[str, list[int]] = {}
    for text in args.input_shape or []:
        name, dims = parse_input_shape(text)
        if name in shapes:
            raise UsageError(f"--input-shape {name}: given twice")
        shapes[name] = dims
    from onnx_graphsurgeon.logger import G_LOGGER

    # onnx-graphsurgeon prints its warnings to stdout, where the summary (or the JSON) goes
    G_LOGGER.severity = G_LOGGER.CRITICAL + 1
    protect = () if overwrite_input else (args.model,)
    _fixed, report = fix(args.model, device=args.device, input_shapes=shapes, power_of_two=args.power_of_two,
                         quantize_bias=args.quantize_bias, align_concat=args.align_scales, inputs=args.inputs,
                         parity=args.parity,
                         num_samples=args.num_samples, seed=args.seed, max_lsb=args.max_lsb, output=out,
                         protect=(*protect, *((args.inputs,) if args.inputs else ())), sdk=args.sdk,
                         time_limit=args.time_limit)
    _emit(json.dumps(report.to_dict(), indent=2) if args.format == "json" else report.to_text(), None)
    return report.exit_code


def _add_fix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fix", help="rewrite a QDQ ONNX model so that it fits a TIDL device, and check the result",
        description="Run the device's pass pipeline (fold weight Q/DQ, remove redundant Q/DQ, static shapes; per "
                    "device, only what TI's documents ask for: per-tensor weights, symmetric zero points, "
                    "power-of-two scales, bias at s_in * s_w) to a fixed point, write OUT atomically, and print what "
                    "each pass changed, the parity of OUT against MODEL in ONNX Runtime, and the findings that "
                    "remain. A model that already meets the device keeps its numerics bit for bit. MODEL is never "
                    "modified. Exit 0 OUT has no errors for the device; 1 OUT written but errors remain that no pass "
                    "can fix; 2 unusable input or usage error (nothing written).")
    p.add_argument("model", metavar="MODEL", help="the QDQ .onnx model")
    p.add_argument("--output", "-o", metavar="OUT", help="where to write the fixed model (never MODEL itself)")
    p.add_argument("--device", "-d", required=True, metavar="NAME",
                   help="one of TDA4VM, AM62A, AM67A, AM68A, AM69A, AM62 (or an alias)")
    _add_sdk_option(p)
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="pin an input's shape, e.g. input:1x3x224x224 (repeatable; a dynamic batch alone is "
                        "pinned to 1 anyway)")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="parity input data, keys = input names; default: seeded random data")
    p.add_argument("--power-of-two", choices=("ceil", "nearest"), default="ceil",
                   help="rounding of scales to powers of two on devices that need them: ceil (TI's, ranges only "
                        "grow) or nearest (default: %(default)s)")
    p.add_argument("--quantize-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="write float Conv/Gemm biases as int32 + DequantizeLinear (default: as the device profile "
                        "says)")
    p.add_argument("--align-scales", action="store_true",
                   help="also align Concat input scales (and Add input scales on TDA4VM) to the largest: tiexport "
                        "advice, no TI document asks for it, and it changes numerics")
    p.add_argument("--in-place", action="store_true", help="allow OUT to be MODEL (or omit -o to rewrite MODEL)")
    p.add_argument("--no-parity", dest="parity", action="store_false", help="skip the parity check")
    p.add_argument("--num-samples", "-n", type=int, default=4, metavar="N",
                   help="random parity samples when no --inputs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random-data seed (default: %(default)s)")
    p.add_argument("--max-lsb", type=float, default=1.0, metavar="L",
                   help="parity tolerance in quantization steps of each output (default: %(default)s)")
    _add_time_limit(p, "fix (passes, checks and parity)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary format (default: %(default)s)")
    p.set_defaults(handler=_cmd_fix)


# ------------------------------------------------------------------------------------------------- main
# Subcommand registrars, in help order. Each adds its parser and sets ``handler``.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_validate, _add_rules, _add_info]
SUBCOMMANDS.append(_add_snippet)
SUBCOMMANDS.append(_add_parity)
SUBCOMMANDS.append(_add_fix)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiexport", description="Export, fix and validate 8-bit QDQ ONNX models for TI TIDL devices.")
    parser.add_argument("--version", action="version", version=f"tiexport {__version__}")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


class _Terminated(SystemExit):
    """SIGTERM, raised where the process is so that writers remove their temp files (exit 143)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated(128 + signum)


_GRACE = 10.0
"""Seconds a SIGTERM waits for the main thread to unwind before the process exits without it."""


class _SigtermWatch:
    """Makes SIGTERM work while the main thread is inside C code (ONNX Runtime, protobuf), where Python's handler
    cannot run until the call returns: Python's C-level handler writes the signal number to a wakeup socket at once,
    and a watcher thread reading it stops the run (:func:`tiexport.limits.stop`: ONNX Runtime returns), so the main
    thread raises :class:`_Terminated` and the writers remove their temp files. Stuck for longer than
    :data:`_GRACE`, the watcher removes the registered temp files and exits the process with 143."""

    def __init__(self) -> None:
        import socket

        self.previous_handler = None
        self.previous_fd = -1
        self.done = threading.Event()
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        try:
            self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
            self.previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # not the main thread of the main interpreter: leave signals alone
            self.close()
            raise
        self.thread = threading.Thread(target=self._watch, name="tiexport-sigterm", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        from tiexport import limits

        while True:
            try:
                data = self.reader.recv(64)
            except OSError:
                return
            if self.done.is_set() or not data:
                return
            if signal.SIGTERM in data:
                limits.stop("terminated (SIGTERM)")
                if not self.done.wait(_GRACE):
                    limits.remove_temp_files()
                    sys.stderr.write("tiexport: terminated\n")
                    os._exit(128 + signal.SIGTERM)
                return

    def close(self) -> None:
        self.done.set()
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            signal.set_wakeup_fd(self.previous_fd)
            self.previous_handler = None
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")  # wakes the watcher, which sees ``done`` and returns
        if getattr(self, "thread", None) is not None:
            self.thread.join(1.0)
        self.reader.close()
        self.writer.close()


def _catch_sigterm() -> _SigtermWatch | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return _SigtermWatch()
    except (ValueError, OSError):
        return None


def _restore_sigterm(watch: _SigtermWatch | None) -> None:
    if watch is not None:
        watch.close()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; callable in-process. Returns the exit code."""
    parser = build_parser()
    watch = _catch_sigterm()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                            format="%(levelname)s %(name)s: %(message)s")
        if not getattr(args, "handler", None):
            raise UsageError("tiexport: a command is required (validate, info, ...); see tiexport --help")
        return int(args.handler(args))
    except _Terminated as exc:
        print("tiexport: terminated", file=sys.stderr)
        return int(exc.code)  # type: ignore[arg-type]
    except LimitExceeded as exc:
        if str(exc).startswith("terminated"):  # SIGTERM stopped ONNX Runtime before Python's handler could run
            print("tiexport: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        _err(f"tiexport: error: {' '.join(str(exc).splitlines())}")
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except TiexportError as exc:
        # one line even when a name inside the message carries a newline
        _err(f"tiexport: error: {' '.join(str(exc).splitlines())}")
        return 2
    except KeyboardInterrupt:
        print("tiexport: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a traceback reaching a user is a bug: one line, details on request
        if os.environ.get("TIEXPORT_DEBUG"):
            raise
        _err(f"tiexport: internal error: {type(exc).__name__}: {first_line(exc, default='')} "
             "(set TIEXPORT_DEBUG=1 for the traceback, and please report it)")
        return 2
    finally:
        _restore_sigterm(watch)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
