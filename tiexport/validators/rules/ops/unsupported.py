"""TIDL040: operators TIDL does not accelerate (outside its operator table, custom domains, standalone layers).

Such a node is not an import failure: TIDL's ONNX Runtime delegate offloads the subgraphs it supports and leaves
the rest to ONNX Runtime on the Arm cores (edgeai-tidl-tools ``examples/osrt_python/README.md``, ``max_num_subgraphs``:
"rest to be delegated to ARM"), so the findings are warnings. The operator table is the release's own
(``device.spec``: edgeai-tidl-tools ``docs/supported_ops_rts_versions.md`` at ``rel_09_02`` ... ``rel_11_00``).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import get_spec
from tiexport.tidl_spec.sources import BENCHMARK_PRESETS, OPS_DOC, OSRT_MAX_SUBGRAPHS, TOOLS_REPO, DocRef
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.ops.base import findings_of
from tiexport.validators.rules.ops.facts import ARM, Violation, in_fused_pattern

__all__ = ["UnsupportedOpRule"]


class UnsupportedOpRule(Rule):
    """TIDL040: an operator TIDL does not accelerate; ONNX Runtime runs it on the Arm cores.

    What: an op without a row in the release's operator table, a node in a custom domain, or an op whose row says
    "not supported as an individual operator" (11.0: Dropout, Identity, Erf, ReduceMean) or that only the fused
    combinations list (Erf inside GELU, ReduceMean (and 9.2/10.0: Pow, Sqrt) inside LayerNorm) used outside them.
    Why: TIDL delegates what it does not support to ONNX Runtime on Arm ("rest to be delegated to ARM"): a warning,
    since every such node costs a TIDL/Arm round trip. On a device without accelerator (AM62: edgeai-benchmark's
    preset turns TIDL offload off) the model gets one info finding and nothing else.
    Fix: replace the op with a supported one (x.mean((2, 3)) -> GlobalAveragePool...); ``tiexport fix`` removes
    Dropout and Identity.
    """

    id = "TIDL040"
    title = "operator not accelerated by TIDL (runs on Arm)"
    category = "unsupported_op"
    sources = (DocRef(TOOLS_REPO, get_spec().branch, OPS_DOC).cite(), OSRT_MAX_SUBGRAPHS, BENCHMARK_PRESETS)
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
                f"{op} is not in TIDL {spec.sdk}'s operator table{ARM}, not an import failure",
                "each Arm node splits the TIDL subgraph; replace it with a TIDL-supported op for full offload",
            )
        if op in ("Dropout", "Identity"):
            return Violation(f"standalone {op} is not a TIDL layer{ARM}",
                             f"tiexport fix removes the {op} (a no-op at inference)", fixable=True)
        if op in spec.standalone_unsupported and not in_fused_pattern(ctx, node):
            if op == "Erf":
                return Violation(f"Erf outside a GELU pattern is not a TIDL layer{ARM}",
                                 "TIDL fuses Erf only in x * 0.5 * (1 + erf(x / sqrt(2))); export nn.GELU as such")
            if op == "ReduceMean":
                return Violation(
                    f"ReduceMean outside a LayerNorm pattern is not a TIDL layer{ARM}",
                    "use GlobalAveragePool for a mean over H and W (x.mean((2, 3)) -> adaptive_avg_pool2d)",
                )
            return Violation(f"{op} is a TIDL {spec.sdk} layer only inside a LayerNorm pattern{ARM}",
                             "use a newer TIDL release or LayerNormalization")
        return None

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        if not device.accelerator:
            yield self.finding(
                ctx, None,
                f"{device.name} has no TIDL accelerator: the whole model runs in ONNX Runtime on Arm",
                "choose an AM6xA/TDA4 device for acceleration", severity="info", source=BENCHMARK_PRESETS,
            )
            return
        yield from findings_of(self, ctx, device, "")
