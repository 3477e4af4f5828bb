"""Constraint rules of the convolutions: Conv (TIDL050), ConvTranspose (TIDL062), DeformConv (TIDL075).

Each follows its row of tidl.md §3; a layer outside them is delegated to Arm.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.rules.ops.base import OpConstraintRule
from tiexport.validators.rules.ops.facts import Violation, hw, is_const_derived, node_input, shape_of

__all__ = ["ConvRule", "ConvTransposeRule", "DeformConvRule"]


def _one_variable_input(ctx: ModelContext, node: onnx.NodeProto) -> Iterator[Violation]:
    """Conv-like layers take one variable input: weight and bias must be constants (tidl.md §3 Conv, ConvTranspose)."""
    for idx, what in ((1, "weight"), (2, "bias")):
        t = node_input(node, idx)
        if t and not is_const_derived(ctx, t):
            yield Violation(f"{what} {t!r} is computed at run time; TIDL's {node.op_type} takes one variable input",
                            f"make the {what} a constant initializer (behind its DequantizeLinear)")


def _kernel(ctx: ModelContext, node: onnx.NodeProto) -> list[int] | None:
    k = ctx.attr(node, "kernel_shape")
    if k is not None:
        return [int(v) for v in k]
    w = shape_of(ctx, node_input(node, 1))
    return None if w is None else list(w[2:])


class ConvRule(OpConstraintRule):
    """TIDL050: a Conv TIDL cannot take.

    What (tidl.md §3 Conv row): weight or bias computed at run time (one variable input); weight dims differing from
    ``kernel_shape``; unequal H/W strides; depthwise (group == input channels) outside the release's list
    (``spec.depthwise``: 9.2 3x3/5x5/7x7 s1 and 3x3 s2; 10.x adds 1x1 s2, 5x5/7x7 s2; 11.0 drops 1x1 s2; the
    "5x5s2, 5x5s2" of 10.x/11.0 is read as 5x5 s1 and s2); kernel > 7 with stride 2; stride 4 with anything but
    11x11; input width < max(pad_left, pad_right); 3x3 stride-3 conv on the devices the release names (10.x: AM62A;
    11.0: AM62A and AM67A).
    Why: TIDL delegates such a Conv to Arm. Fix: change the layer in PyTorch (e.g. a 9x9 depthwise as two 5x5).
    """

    id = "TIDL050"
    title = "Conv kernel/stride/pad combination TIDL does not support"
    ops = frozenset({"Conv"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        yield from _one_variable_input(ctx, node)
        w_shape = shape_of(ctx, node_input(node, 1))
        k_attr = ctx.attr(node, "kernel_shape")
        if k_attr is not None and w_shape is not None and list(w_shape[2:]) != [int(v) for v in k_attr]:
            yield Violation(f"kernel_shape {list(k_attr)} differs from the weight's spatial dims {list(w_shape[2:])}",
                            "re-export; the weight and kernel_shape must agree")
        kernel = _kernel(ctx, node)
        if kernel is None or len(kernel) != 2:
            return  # 1-D/3-D convolutions: tidl.md gives no geometry rules for them
        kh, kw = kernel
        strides = [int(s) for s in ctx.attr(node, "strides", [1, 1])]
        if len(strides) == 2 and strides[0] != strides[1]:
            yield Violation(f"strides {hw(strides)} differ for H and W; TIDL needs equal strides",
                            "use the same stride along H and W")
            return
        s = strides[0] if strides else 1
        group = int(ctx.attr(node, "group", 1))
        depthwise = group > 1 and w_shape is not None and len(w_shape) == 4 and w_shape[1] == 1
        spec = device.spec
        if depthwise and not (kh == kw and (kh, s) in spec.depthwise):
            taken = ", ".join(f"{k}x{k}s{st}" for k, st in sorted(spec.depthwise))
            yield Violation(f"depthwise {kh}x{kw} stride {s}: TIDL {spec.sdk} takes depthwise {taken}",
                            "use a 3x3/5x5/7x7 depthwise kernel at stride 1 or 2 (e.g. stack two 5x5 for a 9x9)")
        if max(kh, kw) > 7 and s == 2:
            yield Violation(f"{kh}x{kw} kernel with stride 2: kernels larger than 7 are unsupported at stride 2",
                            "use a kernel of at most 7x7 at stride 2, or stride 1 followed by a pooling")
        if s == 4 and (kh, kw) != (11, 11):
            yield Violation(f"stride 4 with a {kh}x{kw} kernel: TIDL takes stride 4 only with 11x11",
                            "use two stride-2 layers instead of one stride-4 layer")
        if (kh, kw, s) == (3, 3, 3) and device.name in spec.conv_3x3_stride_3_unsupported_on:
            yield Violation(f"3x3 stride-3 conv is unsupported on {device.name} (TIDL {spec.sdk})",
                            "use stride 1 or 2 (e.g. a 3x3 stride-1 conv and a pooling)")
        pads = ctx.attr(node, "pads")
        in_shape = ctx.static_shape(node_input(node, 0))
        if pads is not None and len(pads) == 4 and in_shape is not None and len(in_shape) == 4:
            width, pad = in_shape[3], max(int(pads[1]), int(pads[3]))
            if width < pad:
                yield Violation(f"padding {pad} is larger than the input width {width}",
                                "pad at most the input width (or pad explicitly before the conv)")


class ConvTransposeRule(OpConstraintRule):
    """TIDL062: a ConvTranspose TIDL does not take.

    What (the ConvTranspose row of the release): weight or bias computed at run time; a kernel outside the release's
    list at stride 2 (``spec.convtranspose_kernels``: 9.2 8x8/4x4/2x2, 10.x 4x4/3x3/2x2, 11.0 4x4/2x2); group other
    than 1 (written from 11.0).
    Why: delegated to Arm. Fix: ``nn.ConvTranspose2d(k=2 or 4, stride=2)``, or nearest Resize x2 then a Conv.
    """

    id = "TIDL062"
    title = "ConvTranspose kernel/stride/group TIDL does not support"
    ops = frozenset({"ConvTranspose"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        yield from _one_variable_input(ctx, node)
        spec = device.spec
        group = int(ctx.attr(node, "group", 1))
        if group != 1 and spec.convtranspose_group_1:
            yield Violation(f"group {group}: TIDL's ConvTranspose takes group 1 only",
                            "use a dense ConvTranspose or Resize + depthwise Conv")
        kernel = _kernel(ctx, node)
        strides = [int(s) for s in ctx.attr(node, "strides", [1, 1])]
        if kernel is None or len(kernel) != 2:
            return
        kernels = spec.convtranspose_kernels
        if not (kernel[0] == kernel[1] and kernel[0] in kernels and strides == [2, 2]):
            taken = " or ".join(f"{k}x{k}" for k in kernels)
            yield Violation(f"{hw(kernel)} kernel at stride {hw(strides)}: TIDL {spec.sdk} takes {taken} at stride 2",
                            "use kernel 2 or 4 with stride 2, or a nearest Resize x2 followed by a Conv")


class DeformConvRule(OpConstraintRule):
    """TIDL075: a DeformConv other than 3x3 stride 1.

    What: TIDL takes DeformConv 3x3 stride 1 only (tidl.md §3 DeformConv row). Why: delegated to Arm.
    Fix: use 3x3 stride-1 deformable convolutions.
    """

    id = "TIDL075"
    title = "DeformConv kernel/stride TIDL does not support"
    ops = frozenset({"DeformConv"})

    def violations(self, ctx: ModelContext, node: onnx.NodeProto, device: DeviceProfile) -> Iterator[Violation]:
        kernel = _kernel(ctx, node)
        strides = [int(s) for s in ctx.attr(node, "strides", [1, 1])]
        if kernel is not None and (kernel != [3, 3] or any(s != 1 for s in strides)):
            yield Violation(f"{hw(kernel)} kernel at stride {hw(strides)}: TIDL takes DeformConv 3x3 stride 1 only",
                            "use a 3x3 stride-1 deformable conv")
