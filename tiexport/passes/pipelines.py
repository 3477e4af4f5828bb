"""The pass pipelines: which passes run, in which order, for a device's fix and after a torch export.

A pipeline is built from :class:`~tiexport.devices.DeviceProfile` fields and the profile's TIDL facts
(``profile.spec``), never from device names: a profile with ``per_channel_weights=False`` gets per-tensor weights,
``asymmetric_activations=False`` symmetric activations, ``power_of_two_scales=True`` power-of-two scales,
``quantize_bias=True`` int32 biases, ``align_add_scales=True`` aligned Add inputs; devices without an accelerator
(everything runs in ONNX Runtime on Arm) get only the exact clean-up passes. Run one with
:func:`~tiexport.passes.base.apply_passes`; :func:`tiexport.fix` does that and checks the result.

:func:`export_pipeline` turns what a torch exporter wrote (with tiexport's markers, see
:mod:`tiexport.passes.expand_markers`) into a clean QDQ model; :func:`tiexport.export` runs it. Every pass in it is
exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tiexport.devices import DeviceProfile, get_device
from tiexport.passes.align_scales import AlignConcatScalesPass
from tiexport.passes.attention_split import SplitQkvBeforeHeadsPass
from tiexport.passes.base import Pass
from tiexport.passes.bias_scale import AlignBiasScalePass
from tiexport.passes.dead_nodes import RemoveDeadNodesPass
from tiexport.passes.expand_markers import ExpandQdqMarkersPass
from tiexport.passes.fold_weights import FoldWeightQuantizationPass
from tiexport.passes.gather_reshape import FoldIdentityGatherPass
from tiexport.passes.identity import RemoveIdentityPass
from tiexport.passes.ir_version import DowngradeIrVersionPass
from tiexport.passes.merge_duplicates import MergeDuplicateQdqPass
from tiexport.passes.normalize_qparams import NormalizeQdqParamsPass
from tiexport.passes.opset import ConvertOpsetPass
from tiexport.passes.per_tensor import ConvertPerChannelToPerTensorPass
from tiexport.passes.power_of_two import EnforcePowerOfTwoScalesPass
from tiexport.passes.quantize_bias import QuantizeBiasPass
from tiexport.passes.reduce_mean import ReplaceReduceMeanWithGlobalPoolPass
from tiexport.passes.redundant_qdq import RemoveRedundantQdqPass
from tiexport.passes.reshape_allowzero import ClearReshapeAllowzeroPass
from tiexport.passes.scalar_gather import ScalarGatherToSlicePass
from tiexport.passes.static_shapes import InferShapesPass, PinInputShapesPass
from tiexport.passes.symmetric import EnforceSymmetricPass
from tiexport.passes.weight_transpose import FoldWeightTransposePass
from tiexport.tidl_spec import PER_TENSOR_WEIGHT_OPS

__all__ = ["export_pipeline", "fix_pipeline"]


def fix_pipeline(
    device: str | DeviceProfile,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    power_of_two: str = "ceil",
    quantize_bias: bool | None = None,
    align_concat: bool = False,
) -> list[Pass]:
    """The ordered passes that make a QDQ model deployable on one device (see the module docstring).

    Only what TI's sources ask for runs by default, so a model that already meets them keeps its numerics bit for
    bit: ``align_concat`` (aligning Concat, and on TDA4VM Add, input scales: tiexport advice) and ``quantize_bias``
    (None: the profile's, off everywhere) are opt-in. A bias already at ``s_in * s_w`` is left alone; one that is not
    (or that another pass moved off it) is requantized there, as TIDL does at import."""
    profile = get_device(device)
    spec = profile.spec
    passes: list[Pass] = [
        DowngradeIrVersionPass(max_ir=spec.max_ir),
        PinInputShapesPass(input_shapes),
        NormalizeQdqParamsPass(),
        RemoveIdentityPass(),
        FoldIdentityGatherPass(),
        ScalarGatherToSlicePass(),
        SplitQkvBeforeHeadsPass(),
        FoldWeightQuantizationPass(),
        RemoveRedundantQdqPass(),
        MergeDuplicateQdqPass(),
        RemoveDeadNodesPass(),
    ]
    bias = profile.quantize_bias if quantize_bias is None else quantize_bias
    if bias:
        passes.append(QuantizeBiasPass())
    if profile.accelerator:
        # the quantization rules below are TIDL's; on a device without an accelerator ONNX Runtime takes any grid
        passes.append(ConvertPerChannelToPerTensorPass(None if not profile.per_channel_weights
                                                       else PER_TENSOR_WEIGHT_OPS))
        passes.append(EnforceSymmetricPass(activations=not profile.asymmetric_activations))
        if align_concat:
            passes.append(AlignConcatScalesPass(add=profile.align_add_scales))
        if profile.power_of_two_scales:
            passes.append(EnforcePowerOfTwoScalesPass(power_of_two))  # type: ignore[arg-type]
        passes.append(AlignBiasScalePass())  # a no-op where the bias already sits at s_in * s_w
    passes.append(InferShapesPass())
    return passes


def export_pipeline(opset: int) -> list[Pass]:
    """The passes that turn an exporter's output into the QDQ model :func:`tiexport.export` writes: markers ->
    Q/DQ with int8 weights, no Identity, Gathers TIDL runs on Arm as Reshape or Slice + Squeeze, attention's q/k/v
    split before the heads (3-D, not 5-D), weight Transposes folded, nothing dead, opset ``opset`` at the lowest IR
    version it allows, spatial ReduceMean -> GlobalAveragePool, no needless Reshape ``allowzero``. The first pass
    (:class:`ExpandQdqMarkersPass`) lists the quantization sites in its ``sites`` afterwards."""
    return [
        ExpandQdqMarkersPass(),
        RemoveIdentityPass(),
        FoldIdentityGatherPass(),
        ScalarGatherToSlicePass(),
        SplitQkvBeforeHeadsPass(),
        FoldWeightTransposePass(),
        RemoveDeadNodesPass(),
        ConvertOpsetPass(opset),
        DowngradeIrVersionPass(max_ir=None),
        ReplaceReduceMeanWithGlobalPoolPass(),
        ClearReshapeAllowzeroPass(),
    ]
