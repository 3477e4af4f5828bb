"""Constraint rules of the resampling layers: Resize/Upsample (TIDL052) and GridSample (TIDL073).

Each follows its row of tidl.md §3; a layer outside them is delegated to Arm.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec import is_power_of_two
from tiexport.validators.rules.ops.base import OpConstraintRule
from tiexport.validators.rules.ops.facts import Violation, const_value, decode, node_input, rank_of

__all__ = ["GridSampleRule", "ResizeRule"]


class ResizeRule(OpConstraintRule):
    """TIDL052: a Resize/Upsample TIDL cannot take.

    What (the Resize/Upsample row; 10.x lists mode, antialias and keep_aspect_ratio_policy only, 9.2 has an Upsample
    row with power-of-2 symmetric ratios and no Resize row, 11.0 all of): mode other than nearest/linear; resizing an
    axis other than H and W;
    scales < 1, not a power of 2 or different for H and W; antialias; keep_aspect_ratio_policy other than stretch;
    coordinate_transformation_mode other than half_pixel/pytorch_half_pixel (nearest needs nearest_mode
    round_prefer_ceil there) or asymmetric (nearest with nearest_mode floor only; linear not allowed); exclude_outside.
    Scales given as ``sizes`` are checked against the inferred input shape (skipped when it is unknown).
    Fix: upsample by 2 (or 4...) with nearest/asymmetric/floor (PyTorch's ``nn.Upsample(scale_factor=2)``) or
    bilinear with align_corners=False.
    """

    id = "TIDL052"
    title = "Resize mode/scale/coordinate mode TIDL does not support"
    ops = frozenset({"Resize", "Upsample"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        mode = str(decode(ctx.attr(node, "mode", "nearest")))
        if mode == "bilinear":  # Upsample-7's spelling of linear
            mode = "linear"
        if mode not in ("nearest", "linear"):
            yield Violation(f"mode {mode!r}: TIDL resizes with nearest or linear only",
                            "use nearest or bilinear interpolation")
        strict = device.spec.resize_attribute_rules
        if strict or device.spec.sdk == "9.2":  # 9.2's Upsample row: power-of-2, symmetric ratios only
            yield from self._scales(ctx, node)
        if node.op_type == "Upsample":
            return  # Upsample has no further attributes
        if int(ctx.attr(node, "antialias", 0)):
            yield Violation("antialias 1: TIDL resizes without antialiasing", "export with antialias=False")
        policy = str(decode(ctx.attr(node, "keep_aspect_ratio_policy", "stretch")))
        if policy != "stretch":
            yield Violation(f"keep_aspect_ratio_policy {policy!r}: TIDL takes 'stretch' only",
                            "resize with explicit scales")
        if not strict:
            return  # 10.x lists mode, antialias and keep_aspect_ratio_policy only
        if int(ctx.attr(node, "exclude_outside", 0)):
            yield Violation("exclude_outside 1: TIDL takes exclude_outside 0 only", "export with exclude_outside=0")
        ctm = str(decode(ctx.attr(node, "coordinate_transformation_mode", "half_pixel")))
        nearest_mode = str(decode(ctx.attr(node, "nearest_mode", "round_prefer_floor")))
        hint = ("nearest: asymmetric + floor (nn.Upsample default); linear: pytorch_half_pixel "
                "(align_corners=False)")
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            if mode == "nearest" and nearest_mode != "round_prefer_ceil":
                yield Violation(f"nearest with {ctm} and nearest_mode {nearest_mode!r}: TIDL needs round_prefer_ceil",
                                hint)
        elif ctm == "asymmetric":
            if mode == "linear":
                yield Violation("linear with coordinate_transformation_mode 'asymmetric' is unsupported", hint)
            elif mode == "nearest" and nearest_mode != "floor":
                yield Violation(f"nearest with asymmetric and nearest_mode {nearest_mode!r}: TIDL needs floor", hint)
        else:
            yield Violation(f"coordinate_transformation_mode {ctm!r}: TIDL takes half_pixel, pytorch_half_pixel or "
                            "asymmetric", hint)

    def _scales(self, ctx: ModelContext, node: onnx.NodeProto) -> Iterator[Violation]:
        x = node_input(node, 0)
        rank = rank_of(ctx, x)
        scales: list[float] | None = None
        if node.op_type == "Upsample":
            attr = ctx.attr(node, "scales")
            scales = [float(s) for s in attr] if attr is not None else const_value(ctx, node_input(node, 1))
        else:
            idx = 1 if ctx.opset < 11 else 2
            raw = const_value(ctx, node_input(node, idx))
            if raw:
                scales = raw
            else:
                sizes = const_value(ctx, node_input(node, 3)) if ctx.opset >= 11 else None
                in_shape = ctx.static_shape(x)
                axes = ctx.attr(node, "axes")
                if sizes and in_shape is not None:
                    dims = [in_shape[a] for a in axes] if axes is not None else list(in_shape)
                    if len(dims) == len(sizes):
                        scales = [s / d for s, d in zip(sizes, dims, strict=True)]
        if not scales or rank is None:
            return
        axes = ctx.attr(node, "axes")
        full = [1.0] * rank
        if axes is not None and len(axes) == len(scales):
            for a, s in zip(axes, scales, strict=True):
                full[int(a) % rank] = s
        elif len(scales) == rank:
            full = scales
        else:
            return
        other = [i for i in range(rank - 2) if full[i] != 1.0]
        if other:
            yield Violation(f"resizes axis {other[0]} (scale {full[other[0]]:g}); TIDL resizes only H and W",
                            "resize only the last two (H, W) axes")
        if rank < 2:
            return
        sh, sw = full[-2], full[-1]
        shown = f"{sh:g}x{sw:g}"
        if sh != sw:
            yield Violation(f"scales {shown} differ for H and W; TIDL needs equal H/W scales",
                            "use the same scale factor for H and W")
        elif sh < 1:
            yield Violation(f"scale {sh:g} < 1 (downsampling); TIDL's Resize only upsamples",
                            "downsample with a strided conv or pooling instead")
        elif not bool(is_power_of_two(np.asarray([sh]))[0]):
            yield Violation(f"scale {sh:g} is not a power of 2; TIDL takes 2, 4, 8... only",
                            "upsample by a power of 2 (e.g. 2x then a conv), or resize on Arm")


class GridSampleRule(OpConstraintRule):
    """TIDL073: a GridSample TIDL does not take.

    What: mode nearest (and from 11.0 bilinear), padding_mode zeros, a 2-D grid (4-D grid tensor) (the GridSample
    rows).
    Why: delegated to Arm. Fix: ``F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros')`` on 4-D input.
    """

    id = "TIDL073"
    title = "GridSample mode/padding/grid TIDL does not support"
    ops = frozenset({"GridSample"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        mode = str(decode(ctx.attr(node, "mode", "bilinear" if ctx.opset < 20 else "linear")))
        modes = device.spec.gridsample_modes
        if mode not in modes and not (mode == "linear" and "bilinear" in modes):
            yield Violation(f"mode {mode!r}: TIDL {device.spec.sdk}'s GridSample takes {' or '.join(modes)}",
                            f"use mode={modes[-1]!r}")
        pad = str(decode(ctx.attr(node, "padding_mode", "zeros")))
        if pad != "zeros":
            yield Violation(f"padding_mode {pad!r}: TIDL takes 'zeros' only", "use padding_mode='zeros'")
        r = rank_of(ctx, node_input(node, 1))
        if r is not None and r != 4:
            yield Violation(f"grid of rank {r}; TIDL samples with a 2-D grid (rank 4) only", "sample in 2-D")
