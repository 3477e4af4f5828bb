"""One registry of tiexport's export-time ops: for each, its TorchScript symbolic and its dynamo translation side by
side, plus the ONNX schema of the marker node they emit.

Nothing is registered globally at import. :meth:`SymbolicRegistry.scoped` registers everything an export needs for
the duration of one ``with`` block and restores the previous global state on exit — including a symbolic a user had
registered under the same name with ``torch.onnx.register_custom_op_symbolic`` — so exporting twice, or exporting
with a user's own symbolics registered, leaks nothing. The TorchScript registry and ONNX's schema registry are
process-global, so the scope holds a lock: concurrent exports from several threads run one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import onnx

from tiexport import compat

__all__ = ["REGISTRY", "ExportOp", "SymbolicRegistry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOp:
    """One torch op with everything both exporters need to translate it.

    ``name``: ``"domain::op"`` as TorchScript sees it. ``overload``: returns the torch OpOverload (the key of the dynamo
    exporter's ``custom_translation_table``). ``torchscript``: symbolic ``fn(g, *args)``. ``dynamo``: onnxscript
    translation ``fn(*args)``. ``schemas``: ONNX schemas of non-standard nodes the two emit, registered in scope.
    """

    name: str
    overload: Callable[[], Any]
    torchscript: Callable[..., Any]
    dynamo: Callable[..., Any]
    schemas: tuple[onnx.defs.OpSchema, ...] = ()


class SymbolicRegistry:
    """Export-time ops by name; registration into torch and ONNX happens only inside :meth:`scoped`."""

    def __init__(self) -> None:
        self._ops: dict[str, ExportOp] = {}
        self._lock = threading.RLock()

    def add(self, op: ExportOp) -> ExportOp:
        if op.name in self._ops:
            raise ValueError(f"export op {op.name!r} is already in the registry")
        self._ops[op.name] = op
        return op

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __iter__(self) -> Iterator[ExportOp]:
        return iter(list(self._ops.values()))

    def __len__(self) -> int:
        return len(self._ops)

    def custom_opsets(self) -> dict[str, int]:
        """Domains of the marker nodes, for the TorchScript exporter's ``custom_opsets``."""
        return {s.domain: s.since_version for op in self._ops.values() for s in op.schemas}

    @contextlib.contextmanager
    def scoped(self, exporter: str, opset: int) -> Iterator[dict[Any, Callable[..., Any]]]:
        """Register every op for one export; yield the dynamo ``custom_translation_table``; restore on exit.

        ``exporter``: ``"torchscript"`` registers the TorchScript symbolics at exactly ``opset`` (so a user symbolic
        registered at another opset cannot shadow ours, and one at this opset is put back afterwards);
        ``"dynamo"`` needs no torch-global registration, only the marker schemas.
        """
        if exporter not in ("torchscript", "dynamo"):
            raise ValueError(f"unknown exporter {exporter!r}")
        with self._lock:
            registered_schemas: list[onnx.defs.OpSchema] = []
            previous: list[tuple[str, Callable[..., Any] | None]] = []
            try:
                for op in self._ops.values():
                    for schema in op.schemas:
                        if _has_schema(schema):
                            continue  # already there (registered by an outer scope of this process): leave it
                        onnx.defs.register_schema(schema)
                        registered_schemas.append(schema)
                if exporter == "torchscript":
                    for op in self._ops.values():
                        previous.append((op.name, compat.get_ts_custom_symbolic(op.name, opset)))
                        compat.set_ts_custom_symbolic(op.name, op.torchscript, opset)
                yield {op.overload(): op.dynamo for op in self._ops.values()}
            finally:
                for name, prev in reversed(previous):
                    compat.restore_ts_custom_symbolic(name, opset, prev)
                for schema in reversed(registered_schemas):
                    onnx.defs.deregister_schema(schema.name, schema.since_version, schema.domain)


def _has_schema(schema: onnx.defs.OpSchema) -> bool:
    try:
        onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
    except onnx.defs.SchemaError:
        return False
    return True


REGISTRY = SymbolicRegistry()
"""The registry ``tiexport.export`` uses; ``tiexport.symbolics.qdq`` adds the quantize-dequantize op to it."""
