"""Helpers the passes share: reading constants and Q/DQ parameters off an onnx-graphsurgeon graph, ONNX Runtime's
quantize/dequantize arithmetic in numpy, node removal and insertion that keep the graph sorted, fresh names derived
from old ones, and :class:`ConstEdits`, which rewrites constants that several nodes may share.

Everything here works on ``onnx_graphsurgeon`` objects in place; nothing imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from tiexport.tidl_spec import QDQ_OPS

__all__ = [
    "ConstEdits",
    "Names",
    "QParams",
    "broadcast_axis",
    "const_value",
    "consumers",
    "dequantize",
    "insert_before",
    "is_const",
    "is_graph_output",
    "is_non_negative",
    "iter_quantizers",
    "producer",
    "qparams",
    "qrange",
    "quantize",
    "remove_node",
    "replace_uses",
    "set_qdq_params",
]

log = logging.getLogger(__name__)


_QRANGES: dict[Any, tuple[int, int]] = {
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int16): (-32768, 32767),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int32): (-(2**31), 2**31 - 1),
}


def qrange(dtype: Any) -> tuple[int, int] | None:
    """(min, max) of an integer quantized type, or None for types the passes do not rewrite."""
    try:
        return _QRANGES.get(np.dtype(dtype))
    except TypeError:
        return None


# ------------------------------------------------------------------------------------------------------- tensors
def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)


def is_const(t: gs.Tensor | None) -> bool:
    """An initializer, or the output of a ``Constant`` node."""
    if t is None:
        return False
    if isinstance(t, gs.Constant):
        return True
    p = producer(t)
    return p is not None and p.op == "Constant" and p.domain in (None, "", "ai.onnx")


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, or None when it is not a constant (or cannot be read)."""
    if t is None:
        return None
    try:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        p = producer(t)
        if p is None or p.op != "Constant":
            return None
        for key, value in p.attrs.items():
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
            if key in ("value_float", "value_int"):
                return np.asarray(value, dtype=np.float32 if key == "value_float" else np.int64)
            if key in ("value_floats", "value_ints"):
                return np.asarray(value, dtype=np.float32 if key == "value_floats" else np.int64)
    except Exception as exc:  # an undecodable constant is simply not rewritten
        log.debug("cannot read constant %s: %s", t.name, exc)
    return None


def replace_uses(old: gs.Tensor, new: gs.Tensor, *, except_node: gs.Node | None = None) -> int:
    """Make every consumer of ``old`` read ``new`` instead; returns how many inputs were rewired."""
    n = 0
    for node in consumers(old):
        if node is except_node:
            continue
        for i, inp in enumerate(node.inputs):
            if inp is old:
                node.inputs[i] = new
                n += 1
    return n


def remove_node(graph: gs.Graph, node: gs.Node) -> None:
    """Disconnect ``node`` and drop it from the graph (its constants go when nothing else reads them)."""
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)


def insert_before(graph: gs.Graph, new: gs.Node, anchor: gs.Node) -> None:
    """Insert ``new`` just before ``anchor`` so a sorted graph stays sorted."""
    for i, n in enumerate(graph.nodes):
        if n is anchor:
            graph.nodes.insert(i, new)
            return
    graph.nodes.append(new)


class Names:
    """Fresh tensor/node names derived from existing ones (``conv_bias`` -> ``conv_bias_quantized``, then ``_1``)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken: set[str] = {n.name for n in graph.nodes if n.name}
        self.taken.update(graph.tensors().keys())

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


# ------------------------------------------------------------------------------------------------------- Q/DQ
@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one QuantizeLinear / DequantizeLinear node, all constants."""

    scale: np.ndarray
    zero_point: np.ndarray
    """Same shape as ``scale``; zeros when the node has no zero-point input."""
    dtype: np.dtype
    """The quantized (integer) type."""
    axis: int
    has_zero_point: bool

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0 and self.scale.size > 1

    @property
    def symmetric(self) -> bool:
        return bool(np.all(self.zero_point == 0))

    @property
    def valid(self) -> bool:
        """Positive finite float scales of a type the passes know (invalid ones are left for the validator)."""
        s = np.asarray(self.scale, dtype=np.float64)
        return (s.size > 0 and bool(np.all(np.isfinite(s)) and np.all(s > 0)) and s.ndim <= 1
                and qrange(self.dtype) is not None)

    def key(self) -> tuple[Any, ...]:
        """Hashable identity of the parameters (for duplicate detection)."""
        return (str(self.dtype), self.axis if self.per_channel else None, self.scale.shape,
                np.asarray(self.scale, np.float32).tobytes(), np.asarray(self.zero_point, np.int64).tobytes())

    def same_as(self, other: QParams) -> bool:
        return self.key() == other.key()

    def float_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) real value the grid represents, per channel."""
        lo, hi = qrange(self.dtype) or (0, 0)
        s = np.asarray(self.scale, np.float64)
        z = np.asarray(self.zero_point, np.int64)
        return (lo - z) * s, (hi - z) * s


def qparams(node: gs.Node) -> QParams | None:
    """The node's quantization parameters, or None when scale/zero point are not constants."""
    if node.op not in QDQ_OPS or len(node.inputs) < 2:
        return None
    scale = const_value(node.inputs[1])
    if scale is None or scale.dtype.kind != "f":
        return None
    zp_t = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if zp_t is not None:
        zp = const_value(zp_t)
        if zp is None or zp.dtype.kind not in "iu":
            return None
        dtype = zp.dtype
        if zp.shape != scale.shape:
            if zp.size != scale.size:
                return None
            zp = zp.reshape(scale.shape)  # ONNX Runtime's quantizer writes scale [1] with a scalar zero point
    else:
        zp = np.zeros(scale.shape, dtype=np.uint8)
        dtype = np.dtype(np.uint8)
        if node.op == "QuantizeLinear" and node.attrs.get("output_dtype"):
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["output_dtype"])))
        elif node.op == "DequantizeLinear":
            src = node.inputs[0]
            value = const_value(src) if is_const(src) else None
            src_dtype = value.dtype if value is not None else getattr(src, "dtype", None)
            if src_dtype is not None:
                dtype = np.dtype(src_dtype)
    try:
        axis, block_size = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0) or 0)
    except (TypeError, ValueError):  # an attribute of the wrong type: onnx.checker reports it
        return None
    if block_size or (np.asarray(scale).size > 1 and not _axis_fits(node.inputs[0], axis, np.asarray(scale).size)):
        return None
    return QParams(scale=np.asarray(scale), zero_point=np.asarray(zp), dtype=np.dtype(dtype),
                   axis=axis, has_zero_point=zp_t is not None)


def iter_quantizers(graph: gs.Graph) -> list[tuple[gs.Node, QParams]]:
    """Every Q/DQ node of ``graph`` whose parameters are constants, with them, in graph order (taken up front:
    a pass may edit the graph while it walks the list)."""
    found = []
    for node in graph.nodes:
        if node.op in QDQ_OPS:
            qp = qparams(node)
            if qp is not None:
                found.append((node, qp))
    return found


def set_qdq_params(nodes: list[gs.Node], edits: ConstEdits, scale: np.ndarray, zero_point: np.ndarray | None = None,
                   dtype: np.dtype | None = None) -> None:
    """Give a QuantizeLinear and its DequantizeLinear readers (``nodes``, the Q first) one new scale, and optionally
    a zero point (added as an input where a node has none) and the integer type it implies (the Q's
    ``output_dtype`` attribute and its output tensor)."""
    for n in nodes:
        edits.set(n, 1, scale)
        if zero_point is None:
            continue
        if len(n.inputs) > 2 and not n.inputs[2].is_empty():
            edits.set(n, 2, zero_point)
        else:
            n.inputs.append(gs.Constant(edits.names(f"{n.name}_zero_point"), zero_point))
    if dtype is not None and nodes:
        q = nodes[0]
        if "output_dtype" in q.attrs:
            q.attrs["output_dtype"] = helper.np_dtype_to_tensor_dtype(dtype)
        q.outputs[0].dtype = dtype


def _axis_fits(data: gs.Tensor, axis: int, size: int) -> bool:
    """A per-axis scale must have one entry per element of the data's ``axis`` (ONNX QuantizeLinear spec); a node
    that breaks this is invalid (validate: TIDL011) and no pass may rewrite it (its arithmetic would not broadcast).
    True when the shape is unknown."""
    value = const_value(data) if is_const(data) else None
    shape = value.shape if value is not None else getattr(data, "shape", None)
    if shape is None:
        return True
    if not -len(shape) <= axis < len(shape):
        return False
    dim = shape[axis]
    return not isinstance(dim, (int, np.integer)) or int(dim) == size


def broadcast_axis(v: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Reshape a per-axis vector so it broadcasts along ``axis`` of a rank-``rank`` array (scalars unchanged)."""
    v = np.asarray(v)
    if v.ndim == 0 or (v.size == 1 and rank == 0):
        return v.reshape(()) if v.size == 1 else v
    shape = [1] * rank
    shape[axis % rank] = -1
    return v.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: Any, axis: int = 1) -> np.ndarray:
    """QuantizeLinear as ONNX Runtime computes it: ``saturate(rint(x / scale) + zp)`` in float32, ties to even."""
    x = np.asarray(x, dtype=np.float32)
    s = broadcast_axis(np.asarray(scale, np.float32), x.ndim, axis)
    z = broadcast_axis(np.asarray(zero_point).astype(np.float32), x.ndim, axis)
    lo, hi = qrange(dtype) or (0, 0)
    if np.dtype(dtype) == np.dtype(np.int32):
        # float32 cannot hold every int32; bias values are rounded in float64 instead (what TI's tooling does)
        q = np.rint(x.astype(np.float64) / s.astype(np.float64)) + z.astype(np.float64)
        return np.clip(q, lo, hi).astype(np.int32)
    q = np.rint(x / s) + z
    return np.clip(q, lo, hi).astype(dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    """DequantizeLinear as ONNX Runtime computes it: ``float(q - zp) * scale`` in float32."""
    q = np.asarray(q)
    s = broadcast_axis(np.asarray(scale, np.float32), q.ndim, axis)
    z = broadcast_axis(np.asarray(zero_point).astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


_NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Sqrt", "Softplus"})


def is_non_negative(t: gs.Tensor, depth: int = 0) -> bool:
    """True when the tensor is provably >= 0: the output of Relu/Sigmoid/..., Clip with min >= 0, or a max pool /
    reshape-like op of such a tensor."""
    p = producer(t)
    if p is None or depth > 8:
        return False
    if p.op in _NON_NEGATIVE_OPS:
        return True
    if p.op == "Clip":
        lo = const_value(p.inputs[1]) if len(p.inputs) > 1 and not p.inputs[1].is_empty() else p.attrs.get("min")
        return lo is not None and bool(np.all(np.asarray(lo) >= 0))
    if p.op in ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Resize",
                "DequantizeLinear", "Concat", "GlobalMaxPool", "AveragePool", "GlobalAveragePool"):
        if p.op == "DequantizeLinear":
            qp = qparams(p)
            return qp is not None and bool(np.all(qp.float_range()[0] >= 0))
        data = [i for i in (p.inputs if p.op == "Concat" else p.inputs[:1]) if not i.is_empty()]
        return bool(data) and all(is_non_negative(i, depth + 1) for i in data)
    return False


# ------------------------------------------------------------------------------------------------------- constants
# ------------------------------------------------------------------------------------------------ weights on disk
_SPILL = threading.local()
SPILL_BYTES = 2**20
"""Replaced weights of this many bytes or more go to the spill file while one is set (:func:`spilling`)."""


@contextlib.contextmanager
def spilling(path: str | None) -> Iterator[None]:
    """Within the block (this thread), :class:`ConstEdits` writes the large weights it is given to ``path`` and
    holds them as read-only memory maps of it, dropping their pages from memory: rewriting a 1 GiB model does not
    hold it in memory twice. None: no spilling."""
    previous = getattr(_SPILL, "path", None)
    _SPILL.path = path
    try:
        yield
    finally:
        _SPILL.path = previous


def spill_array(value: np.ndarray) -> np.ndarray:
    """``value`` written to the spill file and returned as a read-only memory map of it (its pages dropped), when
    spilling and large; else ``value``."""
    path = getattr(_SPILL, "path", None)
    if path is None or isinstance(value, np.memmap) or value.nbytes < SPILL_BYTES or value.dtype.kind not in "biuf":
        return value
    data = np.ascontiguousarray(value)
    with open(path, "ab") as f:
        offset = f.tell()
        f.write(data.data.cast("B"))
    mapped = np.memmap(path, dtype=data.dtype, mode="r", offset=offset, shape=data.shape)
    release(mapped)
    return mapped


def release(value: Any) -> None:
    """Drop the pages of a read-only memory map from memory (read again from its file if used again)."""
    mm = getattr(value, "_mmap", None) if isinstance(value, np.memmap) else None
    if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED)


class ConstEdits:
    """Collects "node input ``i`` should hold value ``v``" requests, then applies them in one go.

    Exporters share scale and zero-point initializers between a QuantizeLinear and its DequantizeLinear, and ONNX
    Runtime's quantizer shares them across several Q/DQ pairs. A constant is changed in place (keeping its name)
    when every node reading it asked for the same new value; otherwise each differing request gets a fresh constant
    named after the old one, so no other reader sees a value meant for someone else.
    """

    def __init__(self, graph: gs.Graph, names: Names | None = None) -> None:
        self.graph = graph
        self.names = names or Names(graph)
        self._requests: list[tuple[gs.Node, int, np.ndarray]] = []

    def set(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        self._requests.append((node, index, spill_array(np.asarray(value))))
        current = node.inputs[index]
        if isinstance(current, gs.Constant):
            release(current._values)  # read by the caller to compute ``value``: its pages can go

    def __len__(self) -> int:
        return len(self._requests)

    def commit(self) -> int:
        """Apply every request; returns how many constants changed value."""
        by_tensor: dict[int, list[tuple[gs.Node, int, np.ndarray]]] = {}
        tensors: dict[int, gs.Tensor] = {}
        for node, index, value in self._requests:
            t = node.inputs[index]
            by_tensor.setdefault(id(t), []).append((node, index, value))
            tensors[id(t)] = t
        changed = 0
        for key, reqs in by_tensor.items():
            t = tensors[key]
            old = const_value(t)
            values = [v for _, _, v in reqs]
            unchanged = old is not None and all(_same(v, old) for v in values)
            for v in (old, *values):
                release(v)  # compared: pages can go
            if unchanged:
                continue
            readers = {(id(n), i) for n in consumers(t) for i, inp in enumerate(n.inputs) if inp is t}
            asked = {(id(n), i) for n, i, _ in reqs}
            all_same = all(_same(v, values[0]) for v in values)
            if isinstance(t, gs.Constant) and all_same and asked >= readers:
                t.values = np.asarray(values[0])
                changed += 1
                continue
            made: list[tuple[np.ndarray, gs.Constant]] = []
            for node, index, value in reqs:
                if old is not None and _same(value, old):
                    continue
                c = next((c for v, c in made if _same(v, value)), None)
                if c is None:
                    c = gs.Constant(self.names(f"{t.name}_{node.name}" if node.name else t.name), np.asarray(value))
                    made.append((value, c))
                    changed += 1
                node.inputs[index] = c
        self._requests.clear()
        return changed


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
