"""DowngradeIrVersionPass: write the oldest IR version the model's opsets allow, when it is newer than TIDL reads.

TIDL is validated with ONNX 1.14 / ONNX Runtime 1.15: IR up to 9 (tidl.md §3 "Other compile limits"); recent ONNX
libraries stamp IR 10+ on every model they write even when nothing in it needs it. Validator rule TIDL003.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx import helper

from tiexport.passes.base import Pass, PassResult

__all__ = ["DowngradeIrVersionPass"]

# element types that need a newer IR than 9: 4-bit integers (IR 10), float4 (IR 11)
_NEW_TYPES = {"int4", "uint4", "float4_e2m1"}


class DowngradeIrVersionPass(Pass):
    """Lower ``ir_version`` to the smallest one the imported opsets need (8 at least with model-local functions), if
    it is above ``max_ir`` (None: whenever it is above that smallest one: the export pipeline's setting).

    Rewrites::

        ir_version 10, opset 17 -> ir_version 8
        ir_version 11, opset 19 -> ir_version 9

    Skipped (with a note): the opsets themselves need a newer IR than ``max_ir`` (opset 21+), or a tensor uses a
    type the older IR does not have (int4/uint4).
    """

    def __init__(self, max_ir: int | None = 9) -> None:
        self.max_ir = max_ir

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ir={self.max_ir})"

    def run(self, graph: gs.Graph) -> PassResult:
        current = graph.ir_version
        if current is None or (self.max_ir is not None and current <= self.max_ir):
            return PassResult(graph, modified=False)
        opsets = [helper.make_opsetid(domain, version) for domain, version in _domains(graph).items()]
        try:
            needed = int(helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        except Exception:
            needed = current
        if graph.functions:
            needed = max(needed, 8)  # model-local functions came with IR 8
        if self.max_ir is not None and needed > self.max_ir:
            return PassResult(graph, modified=False,
                              notes=[f"opsets need IR {needed}, above {self.max_ir}; ir_version kept at {current}"])
        if needed >= current:
            return PassResult(graph, modified=False)
        target = self.max_ir if self.max_ir is not None else max(needed, 3)
        for t in graph.tensors().values():
            dtype = getattr(t, "dtype", None)
            if dtype is not None and str(getattr(dtype, "name", dtype)) in _NEW_TYPES:
                return PassResult(graph, modified=False,
                                  notes=[f"tensor {t.name!r} has type {dtype}, which IR {target} lacks; "
                                         f"ir_version kept at {current}"])
        graph.ir_version = max(needed, 3)
        return PassResult(graph, modified=True, changes=1, numerics_changed=False)


def _domains(graph: gs.Graph) -> dict[str, int]:
    out: dict[str, int] = {"": int(graph.opset)}
    for imp in graph.import_domains or []:
        out["" if imp.domain == "ai.onnx" else imp.domain or ""] = int(imp.version)
    return out
