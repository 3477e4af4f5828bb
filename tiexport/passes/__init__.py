"""The graph-rewriting pipeline: Pass / PassResult / PassManager (``base``), one module per pass, and ``fix``.

Passes rewrite an onnx-graphsurgeon graph in place; :func:`tiexport.workflows.fix.fix` builds the pipeline for a
device from its :class:`~tiexport.devices.DeviceProfile` fields and applies it to a model. Nothing here imports torch.
"""

from __future__ import annotations

from tiexport.passes.align_scales import AlignConcatScalesPass
from tiexport.passes.base import (
    GraphRewriteError,
    Pass,
    PassError,
    PassManager,
    PassResult,
    PassSummary,
    PipelineResult,
    apply_passes,
)
from tiexport.passes.bias_scale import AlignBiasScalePass
from tiexport.passes.dead_nodes import RemoveDeadNodesPass
from tiexport.passes.fold_weights import FoldWeightQuantizationPass
from tiexport.passes.identity import RemoveIdentityPass
from tiexport.passes.ir_version import DowngradeIrVersionPass
from tiexport.passes.merge_duplicates import MergeDuplicateQdqPass
from tiexport.passes.normalize_qparams import NormalizeQdqParamsPass
from tiexport.passes.per_tensor import ConvertPerChannelToPerTensorPass
from tiexport.passes.pipelines import fix_pipeline
from tiexport.passes.power_of_two import EnforcePowerOfTwoScalesPass
from tiexport.passes.quantize_bias import QuantizeBiasPass
from tiexport.passes.redundant_qdq import RemoveRedundantQdqPass
from tiexport.passes.static_shapes import InferShapesPass, PinInputShapesPass
from tiexport.passes.symmetric import EnforceSymmetricPass

__all__ = [
    "AlignBiasScalePass",
    "AlignConcatScalesPass",
    "ConvertPerChannelToPerTensorPass",
    "DowngradeIrVersionPass",
    "EnforcePowerOfTwoScalesPass",
    "EnforceSymmetricPass",
    "FoldWeightQuantizationPass",
    "GraphRewriteError",
    "InferShapesPass",
    "MergeDuplicateQdqPass",
    "NormalizeQdqParamsPass",
    "Pass",
    "PassError",
    "PassManager",
    "PassResult",
    "PassSummary",
    "PinInputShapesPass",
    "PipelineResult",
    "QuantizeBiasPass",
    "RemoveDeadNodesPass",
    "RemoveIdentityPass",
    "RemoveRedundantQdqPass",
    "apply_passes",
    "fix_pipeline",
]
