"""ExpandQdqMarkersPass: tiexport's export markers -> standard QuantizeLinear / DequantizeLinear, weights as int8.

Both torch exporters write every quantization site as one marker node ``tiexport.QuantizeDequantize`` (attributes
``module``, ``scale``, ``zero_point``, ``axis``, ``quant_min``, ``quant_max``; see :mod:`tiexport.symbolics.qdq`).
This pass is the first of the export pipeline (:func:`tiexport.passes.pipelines.export_pipeline`): it turns each
marker into standard ops, names them after the module, and stores weights quantized (tidl.md §2 "8-bit only",
§6 item 5: no float weight behind a QuantizeLinear). The marker domain never reaches a saved file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from tiexport.passes.base import Pass, PassResult
from tiexport.passes.graph import const_value

__all__ = ["MARKER_DOMAIN", "MARKER_OP", "ExpandQdqMarkersPass", "QdqSite"]

MARKER_DOMAIN = "tiexport"
MARKER_OP = "QuantizeDequantize"


@dataclass(frozen=True)
class QdqSite:
    """One expanded quantization site: which module it came from and the nodes it became."""

    module: str
    quantize_node: str | None
    """``None`` for a folded weight (its QuantizeLinear ran at export time)."""
    dequantize_node: str
    clip_node: str | None
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None
    quant_min: int
    quant_max: int
    weight: bool
    output: str
    """Name of the tensor the site produces (the DequantizeLinear output)."""


@dataclass
class _Names:
    """Fresh names, nodes and values each in their own namespace: ``base``, then ``base_1``, ``base_2``..."""

    used_nodes: set[str] = field(default_factory=set)
    used_values: set[str] = field(default_factory=set)

    @staticmethod
    def _fresh(used: set[str], base: str) -> str:
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    def node(self, base: str) -> str:
        return self._fresh(self.used_nodes, base)

    def value(self, base: str) -> str:
        return self._fresh(self.used_values, base)


def is_marker(node: gs.Node) -> bool:
    return node.op == MARKER_OP and (node.domain or "") == MARKER_DOMAIN


class ExpandQdqMarkersPass(Pass):
    """Replace every marker node with standard ops (exact: the expansion computes what torch's fake-quant does).

    Rewrites (``M = tiexport.QuantizeDequantize``, module ``m``)::

        M(w), w constant              -> DequantizeLinear(w_q)      w_q = clamp(rint(w / s) + z, qmin, qmax), int8/uint8
        M(x)                          -> DequantizeLinear(QuantizeLinear(x))
        M(x), narrower than 8 bits    -> per tensor: DQ(Q(Clip(x, (qmin - z) s, (qmax - z) s)))
                                         per channel: DQ(Clip(Q(x), qmin, qmax))

    Names: nodes ``m/QuantizeLinear``, ``m/DequantizeLinear``, ``m/Clip`` (``_1``, ``_2``... for a module's later
    sites, in graph order); initializers ``m.scale``, ``m.zero_point`` (shared by a module's sites with equal
    values), ``m.quantized`` for a weight. :attr:`sites` lists every site expanded so far, in graph order.
    """

    def __init__(self) -> None:
        self.sites: list[QdqSite] = []

    def run(self, graph: gs.Graph) -> PassResult:
        if not any(is_marker(n) for n in graph.nodes):
            return PassResult(graph, modified=False)
        names = _Names({n.name for n in graph.nodes if n.name}, set(graph.tensors().keys()))
        shared: dict[tuple[Any, ...], gs.Constant] = {}
        per_module: Counter[str] = Counter()

        def param(module: str, suffix: str, arr: np.ndarray) -> gs.Constant:
            key = (module, suffix, arr.tobytes() + str(arr.shape).encode(), int(arr.dtype.num))
            if key not in shared:
                shared[key] = gs.Constant(names.value(f"{module}.{suffix}"), arr)
            return shared[key]

        new_nodes: list[gs.Node] = []
        changes = 0
        for node in graph.nodes:
            if not is_marker(node):
                new_nodes.append(node)
                continue
            new_nodes.extend(self._expand(node, names, param, per_module))
            changes += 1
        graph.nodes = new_nodes
        if graph.import_domains:
            graph.import_domains = [d for d in graph.import_domains if d.domain != MARKER_DOMAIN]
        return PassResult(graph, modified=True, changes=changes, numerics_changed=False)

    def _expand(self, node: gs.Node, names: _Names, param: Any, per_module: Counter[str]) -> list[gs.Node]:
        attrs = node.attrs
        raw = attrs["module"]
        module = (raw.decode() if isinstance(raw, bytes) else str(raw)) or "quant"
        scale = np.asarray([float(v) for v in _as_list(attrs["scale"])], dtype=np.float32)
        zps = [int(v) for v in _as_list(attrs["zero_point"])]
        axis = int(attrs["axis"])
        qmin, qmax = int(attrs["quant_min"]), int(attrs["quant_max"])
        signed = qmin < 0
        np_dtype = np.int8 if signed else np.uint8
        full = (qmin, qmax) == ((-128, 127) if signed else (0, 255))
        per_channel = axis >= 0
        if not per_channel:
            scale = scale.reshape(())
        zp = np.asarray(zps, dtype=np_dtype).reshape(scale.shape)
        x, y = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        per_module[module] += 1
        s_t = param(module, "scale", scale)
        z_t = param(module, "zero_point", zp)
        axis_kw = {"axis": axis} if per_channel else {}
        value_scale = tuple(float(v) for v in scale.ravel())
        site_axis = axis if per_channel else None

        w = const_value(x)
        if w is not None:
            w = w.astype(np.float32)
            s_b = scale.reshape(_channel_shape(w.ndim, axis, scale.size)) if per_channel else scale
            z_b = zp.astype(np.int64).reshape(s_b.shape)
            q = np.clip(np.rint(w / s_b) + z_b, qmin, qmax).astype(np_dtype)
            w_q = gs.Constant(names.value(f"{module}.quantized"), q)
            dq = gs.Node("DequantizeLinear", names.node(f"{module}/DequantizeLinear"), attrs=axis_kw,
                         inputs=[w_q, s_t, z_t], outputs=[y])
            self.sites.append(QdqSite(module, None, dq.name, None, value_scale, tuple(zps), site_axis, qmin, qmax,
                                      True, y.name))
            return [dq]

        made: list[gs.Node] = []
        cur = x
        clip_name = None
        if not full and not per_channel:
            lo = np.asarray((qmin - zps[0]) * scale, dtype=np.float32).reshape(())
            hi = np.asarray((qmax - zps[0]) * scale, dtype=np.float32).reshape(())
            clip_name = names.node(f"{module}/Clip")
            clipped = gs.Variable(names.value(f"{clip_name}_output_0"))
            made.append(gs.Node("Clip", clip_name, inputs=[cur, param(module, "clip_min", lo),
                                                           param(module, "clip_max", hi)], outputs=[clipped]))
            cur = clipped
        q_name = names.node(f"{module}/QuantizeLinear")
        q_out = gs.Variable(names.value(f"{q_name}_output_0"))
        made.append(gs.Node("QuantizeLinear", q_name, attrs=dict(axis_kw), inputs=[cur, s_t, z_t], outputs=[q_out]))
        cur = q_out
        if not full and per_channel:
            clip_name = names.node(f"{module}/Clip")
            clipped = gs.Variable(names.value(f"{clip_name}_output_0"))
            bounds = [param(module, "qmin", np.asarray(qmin, dtype=np_dtype)),
                      param(module, "qmax", np.asarray(qmax, dtype=np_dtype))]
            made.append(gs.Node("Clip", clip_name, inputs=[cur, *bounds], outputs=[clipped]))
            cur = clipped
        dq_name = names.node(f"{module}/DequantizeLinear")
        made.append(gs.Node("DequantizeLinear", dq_name, attrs=dict(axis_kw), inputs=[cur, s_t, z_t], outputs=[y]))
        self.sites.append(QdqSite(module, q_name, dq_name, clip_name, value_scale, tuple(zps), site_axis, qmin, qmax,
                                  False, y.name))
        return made


def _as_list(v: object) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _channel_shape(ndim: int, axis: int, n: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = n
    return tuple(shape)
