"""Inputs for a parity run: the model's input specs, user data (.npz, dicts, arrays, batches) checked against
them, or seeded random samples over the range each input is quantized to."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tiexport.context import ModelContext
from tiexport.errors import UnusableInputError, UsageError, first_line
from tiexport.parity.steps import valid_scale

__all__ = ["MAX_RANDOM_ELEMENTS", "InputSpec", "input_specs", "load_inputs", "shape_str"]

@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype and dims (int, or a str / None for a dynamic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    @property
    def dynamic(self) -> list[str]:
        if self.shape is None:
            return ["<unknown rank>"]
        return [str(d) if d is not None else "?" for d in self.shape if not isinstance(d, int) or d <= 0]


def input_specs(ctx: ModelContext) -> list[InputSpec]:
    specs = []
    for vi in ctx.graph_inputs:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UnusableInputError(f"{ctx.name}: input {vi.name!r} is not a tensor; parity needs tensor inputs")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            raise UnusableInputError(f"{ctx.name}: input {vi.name!r} has an unsupported element type "
                                     f"{tt.elem_type}") from None
        shape: tuple[int | str | None, ...] | None = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


MAX_RANDOM_ELEMENTS = 2**27
"""Largest random input generated (elements; 512 MiB of float32): a bigger one is a typo'd dim, or needs --inputs."""
MAX_RANDOM_TOTAL = 2**28
"""Most random input values drawn for one parity run, all samples together (1 GiB of float32)."""


def _random_sample(specs: Sequence[InputSpec], ctx: ModelContext, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sample = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else 0 for d in spec.shape or ())  # checked static by the caller
        if int(np.prod(shape, dtype=np.float64)) > MAX_RANDOM_ELEMENTS:
            raise UsageError(f"input {spec.name!r} has shape {list(shape)}: too large for random data "
                             f"(over {MAX_RANDOM_ELEMENTS} elements); pass --inputs FILE.npz")
        if spec.dtype.kind == "f":
            lo, hi = 0.0, 1.0  # image-like: normalized pixels
            q = next((c for c in ctx.consumers_of(spec.name) if c.op_type == "QuantizeLinear"), None)
            qp = ctx.qparams(q) if q is not None else None
            if qp is not None and not qp.per_channel and qp.qrange is not None and valid_scale(qp.scale):
                # an input quantized right away: cover its representable range, no more
                s = float(qp.scale.reshape(()))
                zp = int(qp.zero_points.reshape(()))
                lo, hi = (qp.qrange[0] - zp) * s, (qp.qrange[1] - zp) * s
            sample[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            sample[spec.name] = rng.random(size=shape) < 0.5
        elif spec.dtype.kind in "iu":
            sample[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        else:
            raise UsageError(f"input {spec.name!r} of type {spec.dtype} cannot be generated; pass --inputs FILE.npz")
    return sample


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise UsageError(f"input {name!r}: cannot convert {type(value).__name__} to an array: {exc}") from None


def _split_samples(arrays: Mapping[str, Any], specs: Sequence[InputSpec], where: str) -> list[dict[str, np.ndarray]]:
    """One dict of arrays -> samples; an array with one more dim than its input carries N samples on axis 0."""
    by_name = {s.name: s for s in specs}
    arrays = {str(k): _to_numpy(v, str(k)) for k, v in arrays.items()}
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise UsageError(f"{where}: unknown input(s) {', '.join(map(repr, unknown))}; "
                         f"model inputs: {', '.join(by_name) or '(none)'}")
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise UsageError(f"{where}: missing input(s) {', '.join(map(repr, missing))}")
    counts = set()
    for name, arr in arrays.items():
        shape = by_name[name].shape
        if shape is not None and arr.ndim == len(shape) + 1:
            counts.add(arr.shape[0])
        else:
            counts.add(None)
    if counts == {None} or not arrays:
        return [dict(arrays)]
    if None in counts or len(counts) != 1:
        raise UsageError(f"{where}: inputs disagree on the number of samples (leading axis): "
                         + ", ".join(f"{n} {tuple(a.shape)}" for n, a in arrays.items()))
    n = counts.pop()
    if not n:
        raise UsageError(f"{where}: zero samples (leading axis of length 0)")
    return [{name: arr[i] for name, arr in arrays.items()} for i in range(int(n))]


def _check_sample(sample: dict[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs:
        arr = sample[spec.name]
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise UsageError(f"{where}: input {spec.name!r} has shape {tuple(arr.shape)}, the model expects rank "
                                 f"{len(spec.shape)} {shape_str(spec.shape)}")
            for got, want in zip(arr.shape, spec.shape, strict=True):
                if isinstance(want, int) and want > 0 and got != want:
                    raise UsageError(f"{where}: input {spec.name!r} has shape {tuple(arr.shape)}, the model expects "
                                     f"{shape_str(spec.shape)}")
        if arr.dtype != spec.dtype:
            same_kind = (arr.dtype.kind in "fiub") and (
                (arr.dtype.kind == "f") == (spec.dtype.kind == "f")
            )
            if not same_kind:
                raise UsageError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
            arr = arr.astype(spec.dtype)
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def shape_str(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.exists():
        raise UnusableInputError(f"{p}: no such file")
    if p.is_dir():
        raise UnusableInputError(f"{p}: is a directory, expected an .npz file")
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise UnusableInputError(f"{p}: not an .npz archive (a single .npy array has no input names)")
            return {k: np.asarray(data[k]) for k in data.files}
    except UnusableInputError:
        raise
    except AttributeError:  # np.load returned a plain array, which has no context manager
        raise UnusableInputError(f"{p}: not an .npz archive (a single .npy array has no input names)") from None
    except Exception as exc:
        raise UnusableInputError(f"{p}: cannot read as .npz: {first_line(exc)}") from None


def load_inputs(
    inputs: Any,
    specs: Sequence[InputSpec],
    ctx: ModelContext | None = None,
    num_samples: int = 8,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Turn ``inputs`` into a list of checked samples (dict input name -> array, dtypes cast to the model's).

    ``inputs``: None (``num_samples`` seeded random samples: float inputs uniform in [0, 1), or over the range of
    the QuantizeLinear that reads them; integer inputs in [0, 4)), a path to an ``.npz`` (keys = input names), a
    dict name -> array, a single array (one-input models), or a list / iterable of batches (consumed up front), each
    a dict, a single array, or a tuple of arrays in the model's input order.
    An array with one more dim than its input holds N samples on its leading axis. ``num_samples`` applies to
    random data only.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {seed!r}")
    if inputs is None:
        if num_samples < 1:
            raise UsageError(f"num_samples must be >= 1, got {num_samples}")
        per_sample = sum(int(np.prod([d for d in s.shape if isinstance(d, int)], dtype=np.float64))
                         for s in specs if s.shape is not None and not s.dynamic)
        # (one input too large for random data at all gets its own message below)
        if per_sample <= MAX_RANDOM_ELEMENTS and per_sample * num_samples > MAX_RANDOM_TOTAL:
            raise UsageError(
                f"{num_samples} random samples of {per_sample} values each would need "
                f"{per_sample * num_samples * 4 / 2**30:.1f} GiB; use fewer samples (at most "
                f"{max(1, MAX_RANDOM_TOTAL // max(per_sample, 1))}) or pass --inputs FILE.npz")
        for spec in specs:
            if spec.dynamic:
                raise UsageError(
                    f"input {spec.name!r} has dynamic dims {spec.dynamic} (shape "
                    f"{shape_str(spec.shape or ())}): random data needs a static shape; pass --inputs FILE.npz "
                    "(keys = input names), or fix the shape first (tiexport fix --input-shape)")
        if ctx is None:
            raise UsageError("random inputs need the model")
        rng = np.random.default_rng(seed)
        return [_random_sample(specs, ctx, rng) for _ in range(num_samples)]
    where = "inputs"
    raw: list[Mapping[str, Any]]
    if isinstance(inputs, (str, os.PathLike)):
        where = str(inputs)
        raw = [_load_npz(inputs)]
    elif isinstance(inputs, Mapping):
        raw = [inputs]
    elif isinstance(inputs, np.ndarray) or hasattr(inputs, "detach"):
        if len(specs) != 1:
            raise UsageError(f"a single array was given but the model has {len(specs)} inputs; pass a dict by name")
        raw = [{specs[0].name: inputs}]
    elif isinstance(inputs, Iterable):
        raw = []
        for i, item in enumerate(inputs):
            if isinstance(item, Mapping):
                raw.append(item)
            elif (isinstance(item, np.ndarray) or hasattr(item, "detach")) and len(specs) == 1:
                raw.append({specs[0].name: item})
            elif isinstance(item, (tuple, list)) and len(item) == len(specs):  # positional, in input order
                raw.append({spec.name: value for spec, value in zip(specs, item, strict=True)})
            else:
                raise UsageError(f"inputs[{i}] is a {type(item).__name__}; expected a dict input name -> array "
                                 f"(or a tuple of {len(specs)} array(s) in input order)")
        if not raw:
            raise UsageError("inputs is empty")
    else:
        raise UsageError(f"inputs must be a dict, a list of dicts, an iterable, a .npz path or None, "
                         f"got {type(inputs).__name__}")
    samples: list[dict[str, np.ndarray]] = []
    for i, item in enumerate(raw):
        label = where if len(raw) == 1 else f"{where}[{i}]"
        for sample in _split_samples(item, specs, label):
            samples.append(_check_sample(sample, specs, label))
    return samples

