"""``validate()``: run every rule that applies to each requested device and collect a Report."""

from __future__ import annotations

import logging
from typing import Any

from tiexport.context import ModelContext, subgraph_contexts
from tiexport.devices import DeviceProfile, resolve_devices
from tiexport.onnx_io import as_model
from tiexport.validators.registry import RULES
from tiexport.validators.report import DeviceReport, Finding, Report
from tiexport.validators.rules.base import Rule

__all__ = ["validate"]

log = logging.getLogger(__name__)


def validate(
    model_or_path: Any,
    device: str | DeviceProfile | list[str | DeviceProfile] | tuple[str | DeviceProfile, ...] | None = "all",
    *,
    rules: tuple[Rule, ...] | None = None,
    sdk: str | None = None,
) -> Report:
    """Check a QDQ ONNX model against TIDL's prequantized-import rules for one or more devices.

    ``model_or_path``: an ``onnx.ModelProto``, a path, or serialized bytes. ``device``: a name (``"TDA4VM"``), an
    alias (``"J721S2"``), ``"all"`` or a list. ``sdk``: the TIDL SDK release to check against (``"10.1"``...;
    None: the latest tiexport knows, :data:`tiexport.tidl_spec.DEFAULT_SDK`). Raises UnusableInputError/UsageError
    for unusable input; rule violations are findings in the returned Report, never exceptions.
    """
    loaded = as_model(model_or_path)
    profiles = resolve_devices(device, sdk)
    ctx = ModelContext(loaded)
    active = rules if rules is not None else RULES
    subgraphs = subgraph_contexts(ctx)  # If branches, Loop/Scan bodies: checked by the rules marked in_subgraphs
    reports: dict[str, DeviceReport] = {}
    shared: dict[tuple[str, str], list[Finding]] = {}  # device-independent rules: once per model and SDK release
    for profile in profiles:
        findings: list[Finding] = []
        for rule in active:
            if not rule.applies_to(profile) or (rule.needs_qdq and not ctx.is_quantized):
                continue
            key = (rule.id, profile.sdk)
            if rule.device_independent and key in shared:
                findings.extend(shared[key])
                continue
            found = _run_rule(rule, ctx, profile)
            if rule.in_subgraphs:
                for sub in subgraphs:
                    found.extend(_run_rule(rule, sub, profile))
            if rule.device_independent:
                shared[key] = found
            findings.extend(found)
        reports[profile.name] = DeviceReport(profile.name, findings)
    return Report(model=loaded.name, devices=reports, sdk=profiles[0].sdk)


def _run_rule(rule: Rule, ctx: ModelContext, profile: DeviceProfile) -> list[Finding]:
    try:
        return list(rule.check(ctx, profile))
    except Exception as exc:  # a rule bug must not hide the other findings or crash the user's CI
        log.debug("rule %s failed", rule.id, exc_info=True)
        return [Finding(
            rule_id="TIDL000", category="structure", severity="error", node="", op_type="",
            message=f"rule {rule.id} could not check this model ({type(exc).__name__}: {exc})",
            hint="the model is probably malformed; please report it if onnx.checker accepts it",
        )]
