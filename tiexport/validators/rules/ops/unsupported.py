"""TIDL040: operators TIDL does not accelerate (outside its operator table, custom domains, standalone layers).

Such a node is not an import failure: TIDL's ONNX Runtime delegate leaves it to ONNX Runtime on the Arm cores and
splits the graph around it (tidl.md §3 "Anything else runs on the Arm cores ... a subgraph split, not an error"), so
the findings are warnings.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.ops.base import findings_of
from tiexport.validators.rules.ops.facts import ARM, Violation, in_fused_pattern

__all__ = ["UnsupportedOpRule"]


class UnsupportedOpRule(Rule):
    """TIDL040: an operator TIDL does not accelerate; ONNX Runtime runs it on the Arm cores.

    What: an op outside TIDL's operator table (tidl.md §3 table), a node in a custom domain, or Dropout / Identity /
    Erf / ReduceMean used as a standalone layer (tidl.md §3 "Dropout, Identity, Erf, ReduceMean: not as standalone
    layers (Erf inside GELU, ReduceMean inside LayerNorm are fused)").
    Why: "Anything else runs on the Arm cores through ONNX Runtime (a subgraph split, not an error)" (tidl.md §3):
    a warning, since every such node costs a TIDL/Arm round trip. On a device without accelerator (AM62, tidl.md §1
    "no accelerator: everything runs on the Arm cores") the model gets one info finding and nothing else.
    Fix: replace the op with a supported one (x.mean((2, 3)) -> GlobalAveragePool...); ``tiexport fix`` removes
    Dropout and Identity.
    """

    id = "TIDL040"
    title = "operator not accelerated by TIDL (runs on Arm)"
    category = "unsupported_op"
    severity = "warning"
    needs_qdq = False
    needs_accelerator = False

    def violation(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Violation | None:
        """Why this node's op type is not a TIDL layer, or None when it is (its constraints aside)."""
        op = node.op_type
        spec = device.spec
        if node.domain not in ("", "ai.onnx"):
            return Violation(
                f"{node.domain}.{op} is not a TIDL operator{ARM}, not an import failure",
                "custom-domain ops always run on Arm; export with standard ONNX ops for full offload",
            )
        if op not in spec.ops:
            return Violation(
                f"{op} is not in TIDL's operator table{ARM}, not an import failure",
                "each Arm node splits the TIDL subgraph; replace it with a TIDL-supported op for full offload",
            )
        if op in ("Dropout", "Identity"):
            return Violation(f"standalone {op} is not a TIDL layer{ARM}",
                             f"tiexport fix removes the {op} (a no-op at inference)", fixable=True)
        if op in spec.standalone_unsupported and not in_fused_pattern(ctx, node):
            if op == "Erf":
                return Violation(f"Erf outside a GELU pattern is not a TIDL layer{ARM}",
                                 "TIDL fuses Erf only in x * 0.5 * (1 + erf(x / sqrt(2))); export nn.GELU as such")
            return Violation(
                f"ReduceMean outside a LayerNorm pattern is not a TIDL layer{ARM}",
                "use GlobalAveragePool for a mean over H and W (x.mean((2, 3)) -> adaptive_avg_pool2d)",
            )
        return None

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        if not device.accelerator:
            yield self.finding(
                ctx, None,
                f"{device.name} has no TIDL accelerator: the whole model runs in ONNX Runtime on Arm",
                "choose an AM6xA/TDA4 device for acceleration", severity="info",
            )
            return
        yield from findings_of(self, ctx, device, "")
