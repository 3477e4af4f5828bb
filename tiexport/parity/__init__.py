"""Numeric parity against ONNX Runtime, per output and per layer, with errors in quantization steps (LSB).

``check_parity(reference, candidate)`` runs the same inputs through a reference (an ONNX model, or a torch module)
and through the candidate ONNX model in ONNX Runtime and compares every output and, with ``per_layer=True``, every
intermediate tensor the two share, naming the first that exceeds its tolerance. Modules, by concern:

- :mod:`~tiexport.parity.compare`: :func:`check_parity`, pairing inputs and outputs of two ONNX models;
- :mod:`~tiexport.parity.metrics`: :class:`TensorMetrics`, the streaming accumulator and the pass criterion;
- :mod:`~tiexport.parity.steps`: the quantization step (LSB) of a tensor;
- :mod:`~tiexport.parity.inputs`: input specs, user data, seeded random samples;
- :mod:`~tiexport.parity.runner`: ONNX Runtime sessions and a runner exposing intermediate tensors;
- :mod:`~tiexport.parity.report`: :class:`ParityReport`, its text and JSON;
- :mod:`~tiexport.parity.torch_reference`: a torch module as reference (torch imported at use only).

Parity runs models; it imports neither the validators nor the passes, and no torch at module level: comparing two
ONNX models works without torch installed.
"""

from __future__ import annotations

from tiexport.parity.compare import ProgressCallback, check_parity
from tiexport.parity.inputs import MAX_RANDOM_ELEMENTS, InputSpec, input_specs, load_inputs
from tiexport.parity.metrics import DEFAULT_ATOL, DEFAULT_RTOL, LSB_SLACK, MIN_FRACTION, TensorMetrics, tensor_metrics
from tiexport.parity.report import LayerResult, ParityReport
from tiexport.parity.runner import OnnxRunner, ort_session
from tiexport.parity.steps import quant_step

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "LSB_SLACK",
    "MAX_RANDOM_ELEMENTS",
    "MIN_FRACTION",
    "InputSpec",
    "LayerResult",
    "OnnxRunner",
    "ParityReport",
    "ProgressCallback",
    "TensorMetrics",
    "check_parity",
    "input_specs",
    "load_inputs",
    "ort_session",
    "quant_step",
    "tensor_metrics",
]
