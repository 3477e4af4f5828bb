"""Loading and saving ONNX models with clear errors, external data handling and atomic writes.

Every loader here raises :class:`~tiexport.errors.UnusableInputError` with a one-line message naming the file and the
problem, never a protobuf or OS traceback. Weights stored as external data are *not* read unless asked for: the
validators only need scales and zero points, so :func:`tensor_to_array` reads single tensors on demand.
Writers never clobber their input and never leave a half-written file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from tiexport import limits
from tiexport.errors import UnusableInputError, UsageError, first_line

__all__ = [
    "LoadedModel",
    "StagedModel",
    "as_model",
    "check_output",
    "check_tensor_budget",
    "external_array",
    "external_data_files",
    "external_data_info",
    "load_model",
    "over_budget",
    "same_file",
    "save_model",
    "serialize",
    "stage_external",
    "tensor_to_array",
    "write_text",
]

def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _iter_graph_tensors(graph: onnx.GraphProto) -> Any:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_graph_tensors(g)


def _external_int(tensor: onnx.TensorProto, entries: dict[str, str], key: str, default: int) -> int:
    """An external-data ``offset``/``length``: a non-negative decimal integer (ONNX Runtime refuses anything else)."""
    text = entries.get(key, "")
    if text == "":
        return default
    if not text.isdigit():  # "abc", "1e3", "-8", " 8": not what ONNX's external-data spec allows
        raise UnusableInputError(f"tensor {_text(tensor.name)!r}: external-data {key} {_text(text)!r} is not a "
                                 "non-negative integer")
    return int(text)


def _elements(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of ``tensor``'s data as ONNX stores it (4-bit types packed two to a byte); None for strings and
    unknown types."""
    n = _elements(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return None if tensor.data_type == onnx.TensorProto.STRING else n * itemsize


def _declared_tensors(graph: onnx.GraphProto) -> Any:
    """Every tensor a graph declares, sparse ones by their dense dims: (name, dims, data_type)."""
    for t in graph.initializer:
        yield t.name, t.dims, t.data_type
    for st in graph.sparse_initializer:
        yield st.values.name, st.dims, st.values.data_type
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t.name or node.name, attr.t.dims, attr.t.data_type
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values.name or node.name, attr.sparse_tensor.dims, \
                    attr.sparse_tensor.values.data_type
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _declared_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _declared_tensors(g)


def check_tensor_budget(model: onnx.ModelProto, name: str) -> None:
    """Refuse (UnusableInputError) a model declaring a tensor larger, dense, than :func:`tiexport.limits.
    memory_budget`: a 100-byte model may hold a sparse constant of 2**40 elements that onnx's checker or ONNX
    Runtime would densify. Reads dims only."""
    budget = limits.memory_budget()
    for tname, dims, data_type in _declared_tensors(model.graph):
        if any(d < 0 for d in dims):
            continue  # the checker's and the rules' business
        over = over_budget(dims, data_type, budget)
        if over:
            raise UnusableInputError(f"{name}: tensor {_text(tname)!r} declares {over} dense; refusing to "
                                     "materialize it")


def over_budget(dims: Any, data_type: int, budget: int) -> str:
    """"N elements (S), over the memory budget of B (...)" when a tensor of ``dims`` and ``data_type`` takes more
    than ``budget`` bytes dense, else ""."""
    n = _elements(dims)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 1
    if n * itemsize <= budget:
        return ""
    return (f"{n} elements ({limits.format_bytes(n * itemsize)}), over the memory budget of "
            f"{limits.format_bytes(budget)} (physical memory, or TIEXPORT_MEMORY_LIMIT)")


def external_data_info(model: onnx.ModelProto) -> list[tuple[str, str, int, int]]:
    """(tensor name, location, offset, length) of every tensor stored outside the model file; UnusableInputError
    for an offset or length that is not a non-negative integer."""
    out = []
    for t in _iter_graph_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = _external_entries(t)
            out.append((t.name, e.get("location", ""), _external_int(t, e, "offset", 0),
                        _external_int(t, e, "length", -1)))
    return out


def external_data_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The external-data files the model at ``path`` reads (empty for a self-contained model or an unusable file)."""
    p = Path(path)
    try:
        model = load_model(p)
    except UnusableInputError:
        return ()
    return tuple(dict.fromkeys(p.parent / loc for _, loc, _, _ in external_data_info(model) if loc))


def _check_external_data(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    sizes: dict[str, int] = {}
    tensor_by_name = {t.name: t for t in _iter_graph_tensors(model.graph)
                      if t.data_location == onnx.TensorProto.EXTERNAL}
    try:
        entries = external_data_info(model)
    except UnusableInputError as exc:
        raise UnusableInputError(f"{path}: {exc}") from None
    for name, location, offset, length in entries:
        if not location:
            raise UnusableInputError(f"{path}: tensor {name!r} is stored externally but names no file")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise UnusableInputError(
                f"{path}: external data of tensor {name!r} points outside the model folder: {location}")
        data_path = base_dir / location
        if location not in sizes:
            if not data_path.is_file():
                raise UnusableInputError(f"{path}: missing external-data file {data_path} (tensor {name!r})")
            sizes[location] = data_path.stat().st_size
        expected = _stored_bytes(tensor_by_name[name]) if name in tensor_by_name else None
        if length >= 0 and expected is not None and length != expected:
            # ONNX Runtime refuses the model too; onnx would read all ``length`` bytes first (8 GiB for a scale)
            raise UnusableInputError(f"{path}: tensor {name!r}: external-data length {length} does not match its "
                                     f"{expected} byte(s) of data")
        end = offset + (length if length >= 0 else (expected or 0))
        if end > sizes[location]:
            raise UnusableInputError(
                f"{path}: external-data file {data_path} is truncated: tensor {name!r} needs bytes "
                f"{offset}..{end}, file has {sizes[location]}"
            )


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = False) -> onnx.ModelProto:
    """Load an ONNX model file; raise UnusableInputError with one clear line for anything unusable.

    External data is checked (files exist and are long enough) but its bytes are only read when
    ``load_external_data`` is true; :func:`tensor_to_array` reads single tensors later.
    """
    p = Path(path)
    if not p.exists():
        raise UnusableInputError(f"{p}: no such file")
    if p.is_dir():
        raise UnusableInputError(f"{p}: is a directory, expected an .onnx file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UnusableInputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise UnusableInputError(f"{p}: empty file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise UnusableInputError(
            f"{p}: not a valid ONNX protobuf (truncated or not ONNX): {first_line(exc)}") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UnusableInputError(f"{p}: not an ONNX model (no IR version, graph or opset import)")
    check_tensor_budget(model, str(p))
    _check_external_data(model, p.parent, p)
    if load_external_data and external_data_info(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise UnusableInputError(f"{p}: cannot read external data: {first_line(exc)}") from None
    return model


def tensor_to_array(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    """Convert one TensorProto to numpy, reading external data for this tensor only if needed."""
    try:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if base_dir is None:
                raise UnusableInputError(f"tensor {tensor.name!r} is stored externally and the model folder is unknown")
            return numpy_helper.to_array(tensor, base_dir=base_dir)
        return numpy_helper.to_array(tensor)
    except UnusableInputError:
        raise
    except Exception as exc:  # numpy_helper raises a mix of ValueError/TypeError/OSError on bad tensors
        raise UnusableInputError(f"tensor {tensor.name!r} cannot be decoded: {first_line(exc)}") from None


def external_array(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """An external tensor as a read-only memory map of its file (nothing read until used; numpy-native types,
    little-endian machines), else read as :func:`tensor_to_array` does."""
    entries = _external_entries(tensor)
    location = entries.get("location", "")
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        dtype = None
    if (dtype is None or tensor.data_type in _PACKED_4BIT or dtype.kind not in "biuf" or not location
            or np.little_endian is False or tensor.data_type == onnx.TensorProto.BFLOAT16):
        return tensor_to_array(tensor, base_dir)
    offset = _external_int(tensor, entries, "offset", 0)
    shape = tuple(int(d) for d in tensor.dims)
    if _elements(shape) == 0:
        return np.zeros(shape, dtype)
    try:
        return np.memmap(Path(base_dir) / location, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError) as exc:
        raise UnusableInputError(f"tensor {_text(tensor.name)!r}: cannot map its external data: {first_line(exc)}"
                                 ) from None


@dataclass(frozen=True)
class LoadedModel:
    """A model with the name to show for it and the folder its external data lives in (None: in memory)."""

    model: onnx.ModelProto
    name: str
    base_dir: str | None


def as_model(model_or_path: Any, *, load_external_data: bool = False) -> LoadedModel:
    """Accept a ModelProto, a path or serialized bytes."""
    if isinstance(model_or_path, LoadedModel):
        return model_or_path
    if isinstance(model_or_path, onnx.ModelProto):
        name = _text(model_or_path.graph.name) or "<model>"
        check_tensor_budget(model_or_path, name)
        return LoadedModel(model_or_path, name, None)
    if isinstance(model_or_path, (str, os.PathLike)):
        p = Path(model_or_path)
        return LoadedModel(load_model(p, load_external_data=load_external_data), str(p), str(p.parent))
    if isinstance(model_or_path, (bytes, bytearray)):
        model = onnx.ModelProto()
        try:
            model.ParseFromString(bytes(model_or_path))
        except DecodeError as exc:
            raise UnusableInputError(f"<bytes>: not a valid ONNX protobuf: {first_line(exc)}") from None
        if model.ir_version <= 0 or not model.HasField("graph"):
            raise UnusableInputError("<bytes>: not an ONNX model (no IR version or graph)")
        check_tensor_budget(model, "<bytes>")
        return LoadedModel(model, "<bytes>", None)
    raise UsageError(f"expected an onnx.ModelProto or a path to an .onnx file, got {type(model_or_path).__name__}")


def _text(name: str | bytes) -> str:
    """A name to show in one-line messages: protobuf hands out a string field that is not valid UTF-8 as bytes, and
    a graph name may hold newlines or other control characters."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    return "".join(c if c.isprintable() else "?" for c in text)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two paths name the same file (existing or not)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


MAX_PROTO = 2**31 - 2**20
"""Largest model kept in one protobuf (onnx.checker, ONNX Runtime and protobuf take in-memory models below 2 GB)."""


def serialize(model: onnx.ModelProto) -> bytes | None:
    """``model`` as protobuf bytes, or None when it is too large for one protobuf (>= :data:`MAX_PROTO`).

    Serializing a ResNet-50-sized model costs as much as ``ByteSize()`` (both walk every weight: 35 ms each,
    bench/RESULTS.md fix section); a caller that needs the bytes several times (checker, ONNX Runtime, the file)
    serializes once with this and hands the bytes on.
    """
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GB
        return None
    return data if len(data) < MAX_PROTO else None


class _TooLarge(Exception):
    """The model does not fit one protobuf: save it with external data."""


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    protect: tuple[str | os.PathLike[str], ...] = (),
    external_data_threshold: int = MAX_PROTO,
    serialized: bytes | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, then rename).

    ``protect`` lists files that must never be overwritten (the input model); writing onto one is a UsageError.
    Models too large for one protobuf go to an external-data file beside ``path`` (:func:`stage_external`: as
    atomic as the rest, never appended to). ``serialized``:
    ``model``'s bytes when the caller already has them (see :func:`serialize`), written as they are.
    """
    out = Path(path)

    def write(tmp: str) -> None:
        if serialized is not None and len(serialized) <= external_data_threshold:
            with open(tmp, "wb") as f:
                f.write(serialized)
        elif serialized is None and model.ByteSize() <= external_data_threshold:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        else:
            raise _TooLarge

    try:
        _atomic_write(out, protect, write)
    except _TooLarge:
        # over 2 GB: weights to a data file of its own beside OUT, then OUT renamed in one step (stage_external);
        # the caller's model stays intact, so the staging rewrites a copy
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        with stage_external(copy, out, source_dir=None, protect=protect) as staged:
            staged.commit()


_ALIGN = 4096
"""External-data offsets are multiples of a page: ONNX Runtime maps aligned tensors instead of copying them."""
_CHUNK = 16 * 2**20


class StagedModel:
    """A model written beside OUT under names no reader uses yet: its external-data file under a name of its own
    (``OUT.data``, else ``OUT.1.data``, ...), its protobuf in a temp file. :meth:`commit` renames the protobuf over
    OUT in one step, so OUT is always a whole model whose weights are all there (the old one with its old data
    file, or the new one with its new file), then removes the data file the old OUT used when it was one of ours.
    Leaving the ``with`` block without a commit removes both new files."""

    def __init__(self, model: onnx.ModelProto, out: Path, tmp: str, data: Path | None, old_data: tuple[Path, ...],
                 serialized: bytes) -> None:
        self.model, self.out, self.tmp, self.data, self.old_data = model, out, tmp, data, old_data
        self.serialized = serialized
        self.committed = False

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.abort()

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.out)
        except OSError as exc:
            self.abort()
            raise UsageError(f"cannot write {self.out}: {exc.strerror or first_line(exc)}") from None
        self.committed = True
        for p in (self.tmp, str(self.data or "")):
            limits.discard_temp_file(p)
        for old in self.old_data:
            if old != self.data:
                with contextlib.suppress(OSError):
                    old.unlink()

    def abort(self) -> None:
        for p in (self.tmp, str(self.data or "")):
            _unlink(p)
            limits.discard_temp_file(p)


def _own_data_name(out: Path, name: str) -> bool:
    """``OUT.data`` or ``OUT.<n>.data``: a data file this writer made for OUT (only those are ever removed)."""
    if name == f"{out.name}.data":
        return True
    middle = name.removeprefix(f"{out.name}.").removesuffix(".data")
    return name.startswith(f"{out.name}.") and name.endswith(".data") and middle.isdigit()


def stage_external(model: onnx.ModelProto, out: str | os.PathLike[str], *, source_dir: str | None,
                   protect: tuple[str | os.PathLike[str], ...] = (), threshold: int = 1024) -> StagedModel:
    """Write ``model`` for OUT with its weights in an external-data file, streaming: tensors already stored outside
    (in ``source_dir``) are copied file to file in 16 MB chunks, top-level initializers of ``threshold`` bytes or
    more are moved out of the proto. ``model`` is rewritten in place to reference the new file (the caller owns it).
    Returns a :class:`StagedModel` to check and :meth:`~StagedModel.commit`."""
    out = check_output(out, protect)
    mode = stat.S_IMODE(out.stat().st_mode) if out.exists() else 0o666 & ~_umask()
    old_data = tuple(p for p in external_data_files(out) if _own_data_name(out, p.name)) if out.is_file() else ()
    k = 0
    while True:
        name = f"{out.name}.data" if k == 0 else f"{out.name}.{k}.data"
        data = out.parent / name
        try:
            fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            k += 1
        except OSError as exc:
            raise UsageError(f"cannot write {data}: {exc.strerror or first_line(exc)}") from None
    limits.add_temp_file(str(data))
    tmp = ""
    try:
        with os.fdopen(fd, "wb") as f:
            written = _write_tensors(model, f, name, source_dir, threshold)
        if not written:  # every tensor small: no data file
            _unlink(str(data))
            limits.discard_temp_file(str(data))
        serialized = model.SerializeToString()
        fd2, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        limits.add_temp_file(tmp)
        with os.fdopen(fd2, "wb") as f:
            f.write(serialized)
        os.chmod(tmp, mode)
    except BaseException as exc:
        for p in (tmp, str(data)):
            _unlink(p)
            limits.discard_temp_file(p)
        if isinstance(exc, OSError):
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or first_line(exc)
            raise UsageError(f"cannot write {out}: {reason}") from None
        raise
    return StagedModel(model, out, tmp, data if written else None, old_data, serialized)


def _write_tensors(model: onnx.ModelProto, f: Any, location: str, source_dir: str | None, threshold: int) -> int:
    """Move the tensors to ``f``; returns the number of tensors written there."""
    top = {id(t) for t in model.graph.initializer}
    written = 0
    offset = 0
    for t in _iter_graph_tensors(model.graph):
        external = t.data_location == onnx.TensorProto.EXTERNAL and bool(_external_entries(t).get("location"))
        if t.data_location == onnx.TensorProto.EXTERNAL and not external:
            # onnx-graphsurgeon keeps the data_location of a constant whose values a pass replaced: the data is here
            t.data_location = onnx.TensorProto.DEFAULT
        if not external and (id(t) not in top or t.ByteSize() < threshold):
            continue
        pad = -offset % _ALIGN
        f.write(b"\0" * pad)
        offset += pad
        if external:
            entries = _external_entries(t)
            if source_dir is None:
                raise UsageError(f"tensor {_text(t.name)!r} is stored externally and its folder is unknown")
            start = _external_int(t, entries, "offset", 0)
            length = _external_int(t, entries, "length", -1)
            if length < 0:
                length = _stored_bytes(t) or 0
            with open(Path(source_dir) / entries.get("location", ""), "rb") as src:
                src.seek(start)
                left = length
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise UnusableInputError(f"tensor {_text(t.name)!r}: external data ends early")
                    f.write(chunk)
                    left -= len(chunk)
        else:
            data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            length = len(data)
            f.write(data)
            del data
        limits.check()
        bare = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
        t.CopyFrom(bare)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        offset += length
        written += 1
    return written


def check_output(out: str | os.PathLike[str], protect: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse (UsageError) an output path that is, or would replace, something other than a plain file of ours: any
    file in ``protect`` or one a protected model reads (its external data), a directory, a symlink, a FIFO or
    device, a missing folder."""
    out = Path(out)
    for p in protect:
        if same_file(out, p):
            raise UsageError(f"{out}: refusing to overwrite the input model")
        # only an existing file can be the input's weights: no second parse of the input otherwise
        if out.exists() and str(p).endswith(".onnx") and any(same_file(out, d) for d in external_data_files(p)):
            raise UsageError(f"{out}: refusing to overwrite the external data of the input model {p}")
    if out.is_symlink():
        raise UsageError(f"{out}: is a symbolic link; write to the file it points at, or another name")
    if out.is_dir():
        raise UsageError(f"{out}: is a directory")
    if out.exists() and not out.is_file():
        raise UsageError(f"{out}: is not a regular file (a FIFO, socket or device); refusing to replace it")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: output folder does not exist")
    return out


def _atomic_write(out: Path, protect: tuple[str | os.PathLike[str], ...], write: Callable[[str], None]) -> None:
    """Check ``out`` (:func:`check_output`), let ``write`` fill a temp file in the same folder, then rename it over
    ``out``, keeping the mode of an existing ``out``; the temp file is removed on any failure (SIGTERM included: the
    CLI turns it into SystemExit). OS errors (no space, file too large, no permission) become one-line UsageErrors."""
    out = check_output(out, protect)
    mode = stat.S_IMODE(out.stat().st_mode) if out.exists() else 0o666 & ~_umask()
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        with limits.temp_file(tmp):  # removed by the CLI's SIGTERM watcher if the process exits without unwinding
            os.chmod(tmp, mode)
            write(tmp)
            os.replace(tmp, out)
    except OSError as exc:
        _unlink(tmp)
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or first_line(exc)
        raise UsageError(f"cannot write {out}: {reason}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    if path and os.path.exists(path):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux shows it in /proc.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_text(path: str | os.PathLike[str], text: str, *, protect: tuple[str | os.PathLike[str], ...] = ()) -> None:
    """Write a text file atomically, refusing to overwrite any path in ``protect`` (the input model)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(Path(path), protect, write)
