"""Pass, PassResult and PassManager: the graph-rewriting framework (design: "Core abstractions").

A :class:`Pass` rewrites an onnx-graphsurgeon graph in place and says what it did in a :class:`PassResult`
(``modified``, how many rewrites, whether outputs can change numerically). Passes are idempotent: a second run on
their own output reports ``modified=False``. :class:`PassManager` runs a list of passes to a fixed point (bounded)
and, when one raises, names it and the passes that ran before it. :func:`apply_passes` does all of it for a
ModelProto: import into onnx-graphsurgeon, run, export back with the model-level fields gs does not carry.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from tiexport import limits
from tiexport.errors import TiexportError, first_line
from tiexport.passes.graph import SPILL_BYTES, spilling

__all__ = [
    "GraphRewriteError",
    "Pass",
    "PassError",
    "PassManager",
    "PassResult",
    "PassSummary",
    "PipelineResult",
    "apply_passes",
]

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What one run of one pass did."""

    graph: gs.Graph
    modified: bool
    changes: int = 0
    """Number of rewrites (nodes folded, merged, removed; Q/DQ parameters changed)."""
    numerics_changed: bool = False
    """True when outputs may differ from before (rounded scales, requantized weights); False means bit-identical."""
    notes: list[str] = field(default_factory=list)
    """Rewrites the pass wanted to do but skipped, with the reason (house style: a failed condition says why)."""


class Pass:
    """One graph rewrite. Subclasses implement :meth:`run` and list their rewrites in the class docstring."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def __call__(self, graph: gs.Graph) -> PassResult:
        return self.call(graph)

    def call(self, graph: gs.Graph) -> PassResult:
        """Run the pass on ``graph`` in place."""
        result = self.run(graph)
        if result.changes and not result.modified:  # a pass that counted a rewrite did modify the graph
            result.modified = True
        return result

    def run(self, graph: gs.Graph) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassError(TiexportError):
    """A pass raised: names the pass and the passes that ran before it (the original error is ``__cause__``)."""

    def __init__(self, failed: str, before: Sequence[str], cause: BaseException) -> None:
        self.failed = failed
        self.before = list(before)
        ran = ", ".join(self.before) if self.before else "none"
        text = first_line(cause, default="")
        super().__init__(f"pass {failed} failed ({type(cause).__name__}: {text}); passes run before it: {ran}")


@dataclass
class PassSummary:
    """Totals of one pass over a whole pipeline run."""

    name: str
    changes: int = 0
    numerics_changed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "changes": self.changes, "numerics_changed": self.numerics_changed}


@dataclass
class PipelineResult:
    """What a PassManager run did: per-pass totals, iterations, and whether a fixed point was reached."""

    graph: gs.Graph
    passes: list[PassSummary]
    iterations: int
    converged: bool

    @property
    def modified(self) -> bool:
        return any(p.changes for p in self.passes)

    @property
    def numerics_changed(self) -> bool:
        return any(p.numerics_changed for p in self.passes)


class PassManager:
    """Runs passes in order, repeatedly, until an iteration modifies nothing (at most ``max_iterations``)."""

    def __init__(self, passes: Sequence[Pass], max_iterations: int = 8) -> None:
        if max_iterations < 1:
            raise ValueError("max_iterations must be >= 1")
        self.passes = list(passes)
        self.max_iterations = max_iterations

    def run(self, graph: gs.Graph) -> PipelineResult:
        summaries = [PassSummary(p.name) for p in self.passes]
        ran: list[str] = []
        iterations = 0
        converged = False
        while iterations < self.max_iterations:
            iterations += 1
            modified = False
            for p, summary in zip(self.passes, summaries, strict=True):
                limits.check()  # the time limit (or a SIGTERM) stops a pipeline between passes
                try:
                    result = p.call(graph)
                except TiexportError:
                    raise
                except Exception as exc:
                    raise PassError(p.name, _unique(ran), exc) from exc
                ran.append(p.name)
                if result.modified:
                    modified = True
                    summary.changes += result.changes
                    summary.numerics_changed |= result.numerics_changed
                    log.debug("%s: %d change(s)%s", p.name, result.changes,
                              " (numerics changed)" if result.numerics_changed else "")
                for note in result.notes:
                    if note not in summary.notes:
                        summary.notes.append(note)
            if not modified:
                converged = True
                break
        if not converged:
            log.warning("passes did not reach a fixed point in %d iterations", self.max_iterations)
        return PipelineResult(graph, summaries, iterations, converged)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


class GraphRewriteError(TiexportError):
    """onnx-graphsurgeon cannot take the model in, or cannot write the rewritten graph back out."""


def apply_passes(model: onnx.ModelProto, passes: Sequence[Pass], *, max_iterations: int = 8, name: str = "model",
                 consume: bool = False, base_dir: str | None = None, spill: str | None = None,
                 ) -> tuple[onnx.ModelProto, PipelineResult]:
    """Run ``passes`` to a fixed point on a copy of ``model`` (never modified); returns the rewritten model and what
    each pass did. Model-level fields onnx-graphsurgeon does not carry (doc string, domain, model version,
    metadata, producer when the graph has none) are kept. ``name`` names the model in errors. ``consume``: the
    caller throws ``model`` away afterwards (an exporter's raw output), so no copy is made (100 MB copied for
    nothing on a ResNet-50 export). ``base_dir``: the folder of ``model``'s external data, when it was loaded
    without it: a pass that reads such a weight gets a read-only memory map of the file, and a weight no pass
    replaced stays an external reference in the result (a 1 GB model is never held in memory). ``spill``: an
    existing file (the caller removes it) where replaced weights of 1 MiB or more are moved before the export, as
    external data under its absolute path: the result then holds no weight twice; only
    :func:`tiexport.onnx_io.stage_external` may read such a result.

    Raises :class:`GraphRewriteError` when the graph cannot be imported or exported, :class:`PassError` when a pass
    fails.
    """
    if consume:
        working = model
    else:
        working = onnx.ModelProto()
        working.CopyFrom(model)  # gs reads lazily from the proto; the caller's model must stay as it was
    try:
        graph = gs.import_onnx(working)
    except Exception as exc:
        raise GraphRewriteError(f"{name}: cannot import the graph for rewriting: {first_line(exc)}"
                                ) from None
    external = _external_values(graph, base_dir) if base_dir is not None else []
    with spilling(spill):
        result = PassManager(passes, max_iterations=max_iterations).run(graph)
    for lazy in external:
        lazy.restore()
    if spill is not None:
        _spill(graph, spill)
    try:
        if not _is_sorted(graph):
            graph.toposort()
        out = gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:
        raise GraphRewriteError(f"{name}: cannot export the rewritten graph: {first_line(exc)}") from None
    out.doc_string = model.doc_string
    out.domain = model.domain
    out.model_version = model.model_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    if not out.producer_name:
        out.producer_name = model.producer_name
        out.producer_version = model.producer_version
    return out, result


class _ExternalValues(gs.ir.tensor.LazyValues):
    """A weight stored outside the model: read as a read-only memory map when a pass asks for its values; put
    back as the external reference at export when no pass replaced it (onnx-graphsurgeon exports LazyValues as
    the TensorProto they wrap)."""

    def __init__(self, constant: gs.Constant, base_dir: str) -> None:
        super().__init__(constant._values.tensor)
        self.constant = constant
        self.base_dir = base_dir
        self.mapped: Any = None
        """A weak reference to the map handed out: a pass that drops it lets its pages go."""

    def load(self) -> Any:
        import numpy as np

        from tiexport.onnx_io import external_array

        values = external_array(self.tensor, self.base_dir)
        if isinstance(values, np.memmap):
            self.mapped = weakref.ref(values)
        return values

    def restore(self) -> None:
        values = self.constant._values
        if values is self or (self.mapped is not None and values is self.mapped()):
            self.constant._values = gs.ir.tensor.LazyValues(self.tensor)




def _spill(graph: gs.Graph, path: str) -> None:
    """Move the weights passes replaced (1 MiB or more) to ``path`` as external data, so that exporting the graph
    does not make a second in-memory copy of them (a 1 GiB model requantized on TDA4VM held both)."""
    import numpy as np

    with open(path, "r+b") as f:
        f.seek(0, 2)
        for g in (graph, *graph.subgraphs(recursive=True)):
            for t in g.tensors().values():
                values = t._values if isinstance(t, gs.Constant) else None
                if not isinstance(values, np.ndarray) or values.nbytes < SPILL_BYTES or \
                        values.dtype.kind not in "biuf" or getattr(t, "export_dtype", values.dtype) != values.dtype:
                    continue
                data: np.ndarray
                if isinstance(values, np.memmap) and isinstance(values.base, mmap.mmap) and \
                        isinstance(values.filename, str):
                    # a whole map (not a view: a view keeps its parent's offset) of a file already: the spill file,
                    # or the input's data under a new constant
                    location, offset, data = values.filename, int(values.offset), values
                else:
                    data = np.ascontiguousarray(values)
                    location, offset = path, f.tell()
                    f.write(data.data.cast("B"))
                proto = onnx.TensorProto(name=t.name, dims=data.shape,
                                         data_type=onnx.helper.np_dtype_to_tensor_dtype(data.dtype))
                proto.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.nbytes))):
                    proto.external_data.add(key=key, value=value)
                t._values = gs.ir.tensor.LazyValues(proto)
                limits.check()


def _external_values(graph: gs.Graph, base_dir: str) -> list[_ExternalValues]:
    out = []
    for g in (graph, *graph.subgraphs(recursive=True)):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and type(t._values) is gs.ir.tensor.LazyValues and \
                    t._values.tensor.data_location == onnx.TensorProto.EXTERNAL:
                lazy = _ExternalValues(t, base_dir)
                t._values = lazy
                out.append(lazy)
    return out


def _is_sorted(graph: gs.Graph) -> bool:
    available = {id(t) for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) or t.is_empty() or id(t) in available:
                continue
            if t.inputs:  # produced by a node that has not run yet
                return False
        available.update(id(t) for t in node.outputs)
    return True
