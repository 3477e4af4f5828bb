"""``fix()``: run a device's pass pipeline over a QDQ model, prove the result loads, compare it, and re-validate it.

The orchestration of one fix, in order: load the model and refuse what cannot be rewritten safely
(:func:`tiexport.context.dag_problem`); run :func:`tiexport.passes.pipelines.fix_pipeline` for the device to a fixed
point (:func:`tiexport.passes.apply_passes`); serialize once and prove that those bytes pass ``onnx.checker`` and
load in ONNX Runtime (or raise :class:`FixError`: nothing is returned or written); validate before and after
(:func:`tiexport.validate`); measure parity against the input (:func:`tiexport.check_parity`), except where the
nodes and weights came out unchanged (outputs identical by construction,
:func:`tiexport.parity.structural.same_computation`); write the checked bytes atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from tiexport import limits
from tiexport.context import ModelContext, dag_problem
from tiexport.devices import DeviceProfile, get_device
from tiexport.errors import TiexportError, UnusableInputError, UsageError, first_line
from tiexport.onnx_io import LoadedModel, as_model, external_data_info, save_model, serialize, stage_external
from tiexport.parity import check_parity, input_specs, load_inputs, ort_session
from tiexport.parity.structural import same_computation
from tiexport.passes.base import GraphRewriteError, PassError, PassSummary, apply_passes
from tiexport.passes.pipelines import fix_pipeline
from tiexport.validators.report import Finding
from tiexport.validators.validate import validate

__all__ = ["FixError", "FixReport", "fix"]

log = logging.getLogger(__name__)

class FixError(TiexportError):
    """The fixed model would not be usable (checker or ONNX Runtime rejects it): nothing is written."""


@dataclass
class FixReport:
    """What ``fix`` did for one device: per-pass change counts, parity against the input, remaining findings."""

    model: str
    device: str
    passes: list[PassSummary]
    iterations: int
    converged: bool
    remaining: list[Finding]
    findings_before: int = 0
    fixable_before: int = 0
    parity: dict[str, Any] | None = None
    """The parity report as a dict (``ParityReport.to_dict()``), or ``{"skipped": reason}``; None when not run."""
    parity_passed: bool | None = None
    bit_identical: bool | None = None
    """Every output equal, element for element, on every sample (None when parity did not run)."""
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    sdk: str = ""
    """The TIDL SDK release whose facts the pipeline and the validation applied."""

    @property
    def numerics_changed(self) -> bool:
        return any(p.numerics_changed for p in self.passes)

    @property
    def changes(self) -> int:
        return sum(p.changes for p in self.passes)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.remaining if f.severity == "error"]

    @property
    def exit_code(self) -> int:
        """0 when no error remains for the device, 1 otherwise (the CLI's contract)."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": self.output,
            "device": self.device,
            "tidl_sdk": self.sdk,
            "passes": [p.to_dict() for p in self.passes],
            "iterations": self.iterations,
            "converged": self.converged,
            "numerics_changed": self.numerics_changed,
            "parity": self.parity,
            "parity_passed": self.parity_passed,
            "bit_identical": self.bit_identical,
            "findings_before": self.findings_before,
            "fixable_before": self.fixable_before,
            "remaining_findings": [f.to_dict() for f in self.remaining],
            "notes": list(self.notes),
        }

    def to_text(self, max_nodes: int | None = 5) -> str:
        """The summary; ``max_nodes`` findings per rule (None: all)."""
        out = self.output or "(not written)"
        lines = [f"tiexport fix: {self.model} -> {out} for {self.device} (TIDL {self.sdk}) "
                 f"({self.iterations} iteration{'s' if self.iterations != 1 else ''}"
                 f"{'' if self.converged else ', no fixed point reached'})"]
        width = max((len(p.name) for p in self.passes), default=10)
        lines.append("  passes (changes):")
        for p in self.passes:
            tag = "  numerics changed" if p.numerics_changed else ""
            lines.append(f"    {p.name:<{width}} {p.changes:>5}{tag}")
            for note in p.notes[:3]:
                lines.append(f"      note: {note}")
            if len(p.notes) > 3:
                lines.append(f"      note: ... {len(p.notes) - 3} more")
        lines.extend(self._parity_lines())
        n_err = len(self.errors)
        n_warn = sum(1 for f in self.remaining if f.severity == "warning")
        lines.append(f"  findings: {self.findings_before} before ({self.fixable_before} fixable), "
                     f"{len(self.remaining)} after: {n_err} error(s), {n_warn} warning(s)")
        by_rule: dict[tuple[str, str], list[Finding]] = {}
        for f in self.remaining:
            if f.severity in ("error", "warning"):
                by_rule.setdefault((f.severity, f.rule_id), []).append(f)
        for (severity, rule_id), group in by_rule.items():
            # readable on a 300-node model: a few nodes per rule, the JSON output (and validate --verbose) has all
            shown = group if max_nodes is None or len(group) <= max_nodes + 1 else group[:max_nodes]
            for f in shown:
                where = f" {f.node}" if f.node else ""
                lines.append(f"    {severity} {rule_id}{where}: {f.message}")
            if len(shown) < len(group):
                lines.append(f"    ... and {len(group) - len(shown)} more {rule_id} (--format json, or tiexport "
                             "validate --verbose OUT, lists all)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        verdict = (f"no errors remain for {self.device}" if not n_err
                   else f"{n_err} error(s) remain that no pass can fix")
        lines.append(f"  result: {verdict}")
        return "\n".join(lines) + "\n"

    def _parity_lines(self) -> list[str]:
        if self.parity is None:
            return ["  parity: not checked"]
        if "skipped" in self.parity:
            return [f"  parity: skipped ({self.parity['skipped']})"]
        if self.parity.get("identical_computation"):
            return ["  parity vs input: bit-identical by construction (nodes and weights unchanged, not run)"]
        verdict = "within tolerance" if self.parity_passed else "over tolerance"
        exact = ", bit-identical" if self.bit_identical else ""
        max_lsb = (self.parity.get("criterion") or {}).get("max_lsb")
        tol = f", tolerance {max_lsb:g} LSB" if isinstance(max_lsb, (int, float)) else ""
        lines = [f"  parity vs input ({self.parity.get('samples', '?')} sample(s){tol}): {verdict}{exact}"]
        for name, m in (self.parity.get("outputs") or {}).items():
            parts = [f"max_abs {_num(m.get('max_abs'))}"]
            if m.get("max_lsb") is not None:
                parts.append(f"max {_num(m.get('max_lsb'))} LSB")
            if m.get("sqnr_db") is not None:
                parts.append(f"SQNR {_num(m.get('sqnr_db'))} dB")
            lines.append(f"    {'ok  ' if m.get('passed') else 'OVER'} {name}: {', '.join(parts)}")
        if not self.parity_passed and self.numerics_changed:
            lines.append("    (passes that change numerics ran; see their counts above)")
        return lines


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


# ----------------------------------------------------------------------------------------------------- fix
def fix(
    model: Any,
    device: str | DeviceProfile | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    power_of_two: str = "ceil",
    quantize_bias: bool | None = None,
    align_concat: bool = False,
    inputs: Any = None,
    parity: bool = True,
    num_samples: int = 4,
    seed: int = 0,
    max_lsb: float = 1.0,
    max_iterations: int = 8,
    output: str | os.PathLike[str] | None = None,
    protect: Sequence[str | os.PathLike[str]] | None = None,
    sdk: str | None = None,
    time_limit: float | None = limits.DEFAULT_TIME_LIMIT,
) -> tuple[onnx.ModelProto, FixReport]:
    """Make a QDQ model deployable on ``device``; returns the fixed model and a :class:`FixReport`.

    ``model``: a path, ``onnx.ModelProto`` (not modified) or serialized bytes. ``input_shapes``: ``{name: dims}`` to
    pin (a dynamic batch alone is pinned to 1 anyway). ``power_of_two``: ``"ceil"`` (TI's rounding, default) or
    ``"nearest"``. ``quantize_bias``: None follows the device profile. ``inputs``: parity inputs (a ``.npz`` path,
    a dict name -> array or a list of such); None: ``num_samples`` seeded random samples. ``max_lsb``: parity
    tolerance in quantization steps of each output (see :func:`tiexport.parity.check_parity`).
    ``sdk``: the TIDL SDK release whose facts apply (None: the latest known). ``output``: also write the fixed
    model there, atomically, and never onto a ``protect`` path (None: the input
    file; ``()`` allows rewriting it in place); the bytes checked are the bytes written.
    ``time_limit``: seconds the whole fix may take (None or 0: no limit); past it, the pass or ONNX Runtime run in
    progress stops and :class:`tiexport.limits.LimitExceeded` is raised with nothing written.
    Raises UsageError / UnusableInputError for bad arguments or input, and :class:`FixError` when the result would
    fail ``onnx.checker`` or ONNX Runtime session creation.
    """
    if device is None:
        raise UsageError("fix needs a device (e.g. device='TDA4VM')")
    if isinstance(device, (list, tuple)) or (isinstance(device, str) and device.strip().lower() == "all"):
        raise UsageError("fix works for one device at a time; run it once per device")
    if power_of_two not in ("ceil", "nearest"):
        raise UsageError(f"power_of_two must be 'ceil' or 'nearest', not {power_of_two!r}")
    for what, value, low in (("max_iterations", max_iterations, 1), ("num_samples", num_samples, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{what} must be an integer >= {low}, got {value!r}")
    if input_shapes is not None and not isinstance(input_shapes, Mapping):
        raise UsageError(f"input_shapes must be a mapping of input name -> dims (e.g. {{'input': [1, 3, 224, 224]}}), "
                         f"got {type(input_shapes).__name__} {input_shapes!r:.60}")
    with limits.time_limit(time_limit, "fix"):
        return _fix(model, get_device(device, sdk), input_shapes=input_shapes, power_of_two=power_of_two,
                    quantize_bias=quantize_bias, align_concat=align_concat, inputs=inputs, parity=parity,
                    num_samples=num_samples, seed=seed, max_lsb=max_lsb, max_iterations=max_iterations,
                    output=output, protect=protect)


def _fix(model: Any, profile: DeviceProfile, *, input_shapes: Mapping[str, Sequence[int]] | None, power_of_two: str,
         quantize_bias: bool | None, align_concat: bool, inputs: Any, parity: bool, num_samples: int, seed: int,
         max_lsb: float, max_iterations: int, output: str | os.PathLike[str] | None,
         protect: Sequence[str | os.PathLike[str]] | None) -> tuple[onnx.ModelProto, FixReport]:
    loaded = as_model(model)
    # A model with external data written to a file is fixed file to file (stage_external); otherwise its weights
    # are read into memory, as the returned ModelProto must carry them.
    stream = output is not None and loaded.base_dir is not None and bool(external_data_info(loaded.model))
    if loaded.base_dir is not None and not stream and external_data_info(loaded.model):
        loaded = as_model(model, load_external_data=True)
    original = loaded.model
    passes = fix_pipeline(profile, input_shapes=input_shapes, power_of_two=power_of_two,
                          quantize_bias=quantize_bias, align_concat=align_concat)

    why = dag_problem(original)
    if why:
        raise UnusableInputError(f"{loaded.name}: {why} (tiexport validate: TIDL002); fix cannot repair that, "
                                 "nothing written")
    why = _unsupported_types(original)
    if why:
        raise UnusableInputError(f"{loaded.name}: {why}; nothing written")
    spill = _spill_file(output) if stream else None
    try:
        return _fix_passes(loaded, profile, passes, spill, stream=stream, inputs=inputs, parity=parity,
                           num_samples=num_samples, seed=seed, max_lsb=max_lsb, max_iterations=max_iterations,
                           output=output, protect=protect)
    finally:
        if spill is not None:
            _unlink_temp(spill)


def _spill_file(output: str | os.PathLike[str] | None) -> str:
    """An empty temp file beside OUT where the passes put the weights they replace (registered for SIGTERM)."""
    out = Path(output or ".")
    try:
        fd, path = tempfile.mkstemp(prefix=f".{out.name}.spill.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise UsageError(f"cannot write in {out.parent}: {exc.strerror or first_line(exc)}") from None
    os.close(fd)
    limits.add_temp_file(path)
    return path


def _unlink_temp(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    limits.discard_temp_file(path)


def _fix_passes(loaded: LoadedModel, profile: DeviceProfile, passes: Any, spill: str | None, *, stream: bool,
                inputs: Any, parity: bool, num_samples: int, seed: int, max_lsb: float, max_iterations: int,
                output: str | os.PathLike[str] | None, protect: Sequence[str | os.PathLike[str]] | None,
                ) -> tuple[onnx.ModelProto, FixReport]:
    original = loaded.model
    try:
        fixed, result = apply_passes(original, passes, max_iterations=max_iterations, name=loaded.name,
                                     base_dir=loaded.base_dir if stream else None, spill=spill)
    except (GraphRewriteError, PassError) as exc:
        # A pass tripping over a model that onnx.checker or ONNX Runtime already rejects is the input's fault
        broken = _unusable_because(original)[0]
        if broken:
            raise UnusableInputError(f"{loaded.name}: the input model already fails {broken}; fix cannot repair "
                                     "that, nothing written") from None
        if isinstance(exc, GraphRewriteError):
            raise FixError(str(exc)) from None
        raise
    identical = not any(p.numerics_changed for p in result.passes) and same_computation(original, fixed)
    if protect is None:
        protect = (loaded.name,) if loaded.base_dir is not None else ()
    if stream:
        # Weights stay in files: the unchanged ones are copied from the input's data file to OUT's, the changed ones
        # written out, and every check below runs on those files (a 1 GB model is never held in memory, and ONNX
        # Runtime maps the aligned weights). OUT appears only at the end, with its data complete.
        assert output is not None
        fixed_name = str(output)
        with stage_external(fixed, output, source_dir=loaded.base_dir, protect=tuple(protect)) as staged:
            out_dir = str(staged.out.parent)
            session = _check_usable(fixed, staged.serialized, original, loaded.name, path=staged.tmp)
            report = _prove(loaded, LoadedModel(fixed, fixed_name, out_dir), result, profile, session,
                            identical=identical, parity=parity, inputs=inputs, num_samples=num_samples, seed=seed,
                            max_lsb=max_lsb, max_iterations=max_iterations)
            limits.check()  # stopped (time limit, SIGTERM) while checking: nothing written
            staged.commit()
        report.output = fixed_name
        return fixed, report
    data = serialize(fixed)  # once: the checker, ONNX Runtime and the written file all take these bytes
    session = _check_usable(fixed, data, original, loaded.name)
    report = _prove(loaded, as_model(fixed), result, profile, session,
                    identical=identical, parity=parity, inputs=inputs, num_samples=num_samples, seed=seed,
                    max_lsb=max_lsb, max_iterations=max_iterations)
    if output is not None:
        limits.check()  # stopped (time limit, SIGTERM) while validating: nothing written
        save_model(fixed, output, protect=tuple(protect), serialized=data)
        report.output = str(output)
    return fixed, report


def _prove(loaded: LoadedModel, fixed: LoadedModel, result: Any, profile: DeviceProfile, session: Any, *,
           identical: bool, parity: bool, inputs: Any, num_samples: int, seed: int, max_lsb: float,
           max_iterations: int) -> FixReport:
    """Validate before and after, and establish parity (by construction when ``identical``): the report."""
    before = validate(loaded, profile).devices[profile.name].findings
    after = validate(fixed, profile).devices[profile.name].findings
    report = FixReport(
        model=loaded.name, device=profile.name, sdk=profile.sdk, passes=result.passes, iterations=result.iterations,
        converged=result.converged, remaining=list(after), findings_before=len(before),
        fixable_before=sum(1 for f in before if f.fixable),
    )
    if not result.converged:
        report.notes.append(f"no fixed point after {max_iterations} iterations; the output is the last state")
    if parity and inputs is None and identical:
        # Nodes, weights, inputs and outputs are those of the input (only shape annotations or node order differ):
        # the outputs are bit-identical by construction, a stronger proof than running samples, and running
        # ResNet-50 twice was a third of fix's time (bench/RESULTS.md, fix section).
        report.parity = {"identical_computation": True, "samples": 0}
        report.parity_passed = report.bit_identical = True
        report.notes.append("nodes and weights unchanged: outputs identical by construction, parity not run")
    elif parity:
        samples = num_samples
        if inputs is None and not report.numerics_changed and num_samples > 1:
            # Only exact rewrites ran: the outputs must be bit-identical, which one sample confirms as well as
            # eight; parity is most of fix's time on a large model (bench/RESULTS.md, fix section).
            samples = 1
            report.notes.append("only exact rewrites ran: parity checked on one sample (must be bit-identical)")
        report.parity, report.parity_passed, report.bit_identical = _parity(
            loaded, fixed, inputs=inputs, num_samples=samples, seed=seed, max_lsb=max_lsb, session=session)
    return report


_NARROW = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4"}
_HALF = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def _unsupported_types(model: onnx.ModelProto) -> str:
    """Why the passes cannot rewrite a valid model's Q/DQ types ("" when they can): 4-bit codes (onnx-graphsurgeon
    cannot write them back, and TIDL quantizes to 8 or 16 bits) or half-precision scales (the passes write float32
    scales beside float16 activations, which onnx.checker rejects)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = node.input[2] if len(node.input) > 2 else ""
        code = types.get(zp) or (types.get(node.input[0]) if node.op_type == "DequantizeLinear" else None)
        if code in _NARROW:
            return (f"{node.name or node.op_type} quantizes to {_NARROW[code]}: TIDL runs 8- and 16-bit quantization "
                    "only (tiexport validate: TIDL012), and fix does not requantize 4-bit weights; re-export with "
                    "8-bit weights and activations")
        scale = types.get(node.input[1]) if len(node.input) > 1 else None
        if scale in _HALF:
            return (f"{node.name or node.op_type} has a {_HALF[scale]} scale: fix rewrites float32 QDQ models and "
                    "TIDL expects float32 scales (tiexport validate: TIDL011); export the model in float32 "
                    "(model.float() before the export)")
    return ""


def _unusable_because(model: onnx.ModelProto, data: bytes | None = None, path: str | None = None) -> tuple[str, Any]:
    """Why onnx.checker (with strict shape inference) or ONNX Runtime session creation rejects ``model`` ("" when
    both accept it), and the ONNX Runtime session made (None when it was not). ``data``: ``model`` serialized, when
    the caller has it (see :func:`tiexport.onnx_io.serialize`)."""
    if data is None:
        data = serialize(model)
    if data is None:
        log.warning("model over 2 GB: onnx.checker and the ONNX Runtime load check are skipped")
        return "", None
    try:
        # a written model is checked as a file: its external data resolves beside it
        onnx.checker.check_model(path or data)
        # TIDL resolves every shape with ONNX shape inference (tidl.md §2): declared shapes that inference
        # contradicts make a broken model even where ONNX Runtime loads it. Checked on the weight-free skeleton.
        onnx.checker.check_model(ModelContext(LoadedModel(model, "", None)).skeleton, full_check=True)
    except Exception as exc:
        return f"onnx.checker: {first_line(exc)}", None
    try:
        # made as parity makes its sessions, so that parity reuses it for the fixed model
        return "", ort_session(path or data)
    except Exception as exc:
        return f"ONNX Runtime session creation: {first_line(exc)}", None


def _check_usable(fixed: onnx.ModelProto, data: bytes | None, original: onnx.ModelProto, name: str,
                  path: str | None = None) -> Any:
    """The promise of ``fix``: what it returns passes onnx.checker and loads in ONNX Runtime (checked on the file
    at ``path`` when it is written there). Returns the session."""
    why, session = _unusable_because(fixed, data, path)
    if not why:
        return session
    if _unusable_because(original)[0]:
        raise UnusableInputError(f"{name}: the input model already fails {why}; fix cannot repair that, "
                                 "nothing written")
    raise FixError(f"{name}: the fixed model fails {why}; nothing written")


# ----------------------------------------------------------------------------------------------------- parity
def _parity(reference: Any, candidate: LoadedModel, *, inputs: Any, num_samples: int, seed: int,
            max_lsb: float = 1.0, session: Any = None) -> tuple[dict[str, Any], bool | None, bool | None]:
    """Compare the fixed model with the input: (report dict, passed, bit-identical). Uses
    :func:`tiexport.parity.check_parity` on seeded random samples drawn for the fixed model's (static)
    input shapes over the input quantizer's range, or on the given ``inputs``."""
    if inputs is None:
        if num_samples < 1:
            raise UsageError(f"num_samples must be >= 1, got {num_samples}")
        try:
            # the fixed model's (pinned, static) input shapes, over the input model's input quantizer's range
            inputs = load_inputs(None, input_specs(ModelContext(as_model(candidate))), ModelContext(reference),
                                 num_samples, seed)
        except UsageError as exc:  # dynamic or huge inputs: fixing is still useful without parity
            return {"skipped": str(exc)}, None, None
    try:
        rep = check_parity(reference, candidate, inputs=inputs, num_samples=num_samples, seed=seed, max_lsb=max_lsb,
                           candidate_session=session, time_limit=None)  # within fix's own limit
    except (UsageError, limits.LimitExceeded):
        raise
    except TiexportError as exc:  # the input model itself does not run: fixing it is still useful
        return {"skipped": str(exc)}, None, None
    d = rep.to_dict()
    exact = all(m.get("max_abs") == 0 for m in d.get("outputs", {}).values())
    return d, bool(rep.passed), exact
