"""Conv+BatchNorm folding for torch.ao's QAT Conv+BN modules: one formula for training, calibration and export.

torch's QAT Conv+BN modules (``torch.ao.nn.intrinsic.qat.ConvBn2d``...) fake-quantize the BN-folded weight. The
frozen forward installed here and the export's folding (:mod:`tiexport.symbolics.lowering`) both use
:func:`conv_bn_folding`, so that training, calibration and the exported ONNX quantize the same values and add the
same bias; :func:`init_weight_qparams` observes those folded weights before the first forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from tiexport import compat
from tiexport.quantization import fused
from tiexport.quantization.fake_quantize import TidlFakeQuantize
from tiexport.quantization.observers import WeightObserver
from tiexport.quantization.reuse import reuse_result

__all__ = [
    "TracedIdentity", "conv_bn_folding", "init_weight_qparams", "install_conv_bn_forward",
    "swap_batch_norm_subclasses",
]


def install_conv_bn_forward(module: Any) -> int:
    """Give every torch.ao QAT Conv+BN module in ``module`` a cheaper forward of the same function.

    torch's ``_ConvBnNd._forward_approximate`` runs ``bn(conv(x, fq(W * f)) / f + b_c)`` with ``f = g/std`` per
    output channel: the division and the bias add are passes over the whole activation, forward and backward
    (``DivBackward`` alone was 12 % of a ResNet-20 QAT step on CPU, bench/RESULTS.md, QAT section). Installed per
    instance on ``_forward_approximate``:

    - batch norm updating (training-mode statistics): ``bn(conv(x, fq(W * f) / f, b_c))``. Convolution is linear
      in its weight per output channel, so dividing the fake-quantized weight by ``f`` is the same function as
      dividing the output, on a tensor the size of the weight; the conv adds ``b_c`` itself. Gradients reach
      ``W``, ``g`` and ``b_c`` through the same expressions (equal up to float rounding, a test holds it).
    - batch norm frozen (running statistics): ``conv(x, fq(W * f), (b_c - mean) * f + beta)``, torch's own
      "Z_inference" formula and what the exported ONNX (and TIDL) computes.

    Falls back to torch's method where it would not apply (no running statistics, a batch norm without affine
    weight). Returns how many modules it set.
    """
    conv_bn = compat.ao_classes()["conv_bn_qat"]
    count = 0
    for m in module.modules():
        if conv_bn and isinstance(m, conv_bn) and callable(getattr(type(m), "_forward_approximate", None)):
            m._forward_approximate = types.MethodType(_conv_bn_forward, m)
            count += 1
    return count


def conv_bn_folding(m: Any) -> tuple[Any, Any]:
    """``(factor, bias)`` of a QAT Conv+BN module with running statistics: the folded weight is ``weight * factor``
    per output channel (``gamma / std``, the expression torch's ``_forward_approximate`` fake-quantizes) and the
    folded bias ``beta + (b_c - mean) * factor``. One definition for the frozen forward below and the export's
    folding (tiexport.symbolics.lowering), so that both fake-quantize the same values and add the same bias."""
    bn = m.bn
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    conv_bias = m.bias if m.bias is not None else torch.zeros_like(std)
    return factor, beta + (conv_bias - bn.running_mean) * factor


def _conv_bn_forward(self: Any, x: Any) -> Any:
    bn = self.bn
    if bn.running_var is None or bn.running_mean is None or bn.weight is None:
        return type(self)._forward_approximate(self, x)
    if bn.training:
        weight = _fused_training_weight(self)
        if weight is None:
            factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape([-1] + [1] * (self.weight.dim() - 1))
            weight = self.weight_fake_quant(self.weight * factor) / factor
        bias = None if self.bias is None else _as_dtype(self.bias, x.dtype)
        return bn(self._conv_forward(x, _as_dtype(weight, x.dtype), bias))
    fused_out = _fused_frozen_weight_and_bias(self)
    if fused_out is not None:
        weight, bias = fused_out
    else:
        factor, bias = conv_bn_folding(self)
        weight = self.weight_fake_quant(_folded_weight(self, factor))
    return self._conv_forward(x, weight, _as_dtype(bias, x.dtype))


def _as_dtype(t: Any, dtype: Any) -> Any:
    # t.to(dtype) returns t itself when the dtype matches, but still dispatches an op (one per conv per step)
    return t if t.dtype == dtype else t.to(dtype)


def _fused_observe(m: Any, frozen: bool) -> bool | None:
    """Whether the fused Conv+BN op applies to ``m`` in this forward: None if not, else whether its weight
    fake-quant observes. It applies where a plain call of the weight fake-quant would take its fused op
    (``TidlFakeQuantize._fused_observe``), with autograd on, a float32 CPU batch norm, and nothing attached to the
    fake-quant that the op would bypass (hooks, bias calibration's probe)."""
    fq = m.weight_fake_quant
    weight, bn = m.weight, m.bn
    tensors = [bn.weight, bn.running_var] + ([bn.bias, bn.running_mean] if frozen else [])
    if frozen and m.bias is not None:
        tensors.append(m.bias)
    if not (isinstance(fq, TidlFakeQuantize) and torch.is_grad_enabled() and weight.requires_grad
            and isinstance(fq.activation_post_process, WeightObserver) and not fq.bypass and fq.probe is None
            and not (fq._forward_hooks or fq._forward_pre_hooks or fq._backward_hooks)
            and all(t is not None and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)):
        return None
    observe = fq._fused_observe(weight)
    if observe is not None:
        fq.__dict__.pop("_output_cache", None)
    return observe


def _fused_training_weight(m: Any) -> Any:
    """``fq(W * f) / f`` by the fused op (:func:`tiexport.quantization.fused.conv_bn_weight`, bit for bit the
    expressions of :func:`_conv_bn_forward`) when it applies (:func:`_fused_observe`), else None."""
    observe = _fused_observe(m, frozen=False)
    if observe is None:
        return None
    fq = m.weight_fake_quant
    out = fused.conv_bn_weight(m.weight, m.bn.weight, m.bn.running_var, m.bn.eps, fq, fq.activation_post_process,
                               observe)
    if observe:
        fq._zero_points_zero(True)
    return out


def _fused_frozen_weight_and_bias(m: Any) -> tuple[Any, Any] | None:
    """``(fq(W * f), beta + (b_c - mean) * f)`` of a frozen batch norm (:func:`conv_bn_folding`) by the fused op
    (:func:`tiexport.quantization.fused.conv_bn_frozen`, bit for bit) when it applies, else None."""
    observe = _fused_observe(m, frozen=True)
    if observe is None:
        return None
    fq, bn = m.weight_fake_quant, m.bn
    out = fused.conv_bn_frozen(m.weight, bn.weight, bn.bias, m.bias, bn.running_mean, bn.running_var, bn.eps, fq,
                               fq.activation_post_process, observe)
    if observe:
        fq._zero_points_zero(True)
    return out


def _folded_weight(m: Any, factor: Any) -> Any:
    """``m.weight * factor`` per output channel; without autograd, the same tensor object as long as the weight,
    gamma, running variance and eps are unchanged (:func:`reuse_result`), so that the weight fake-quant can reuse
    its output (``TidlFakeQuantize``: PTC calibration and evaluation quantize each weight once)."""
    shape = [-1] + [1] * (m.weight.dim() - 1)
    sources = (m.weight, m.bn.weight, m.bn.running_var)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
        m.__dict__.pop("_folded_weight_cache", None)
        return m.weight * factor.reshape(shape)
    return reuse_result(m, "_folded_weight_cache", sources, float(m.bn.eps), lambda: m.weight * factor.reshape(shape))


def init_weight_qparams(graph_module: torch.nn.Module) -> None:
    """Give every weight fake-quant its scale from the weights now, before any forward pass.

    Weights are known at wrap time; without this, observers frozen from the start (``num_observer_update_epochs=0``)
    would leave per-channel weight scales at torch's placeholder, a single 1.0. Conv+BN QAT modules quantize the
    BN-folded weight, so that is what is observed.
    """
    with torch.no_grad():
        for m in graph_module.modules():
            fq = getattr(m, "weight_fake_quant", None)
            weight = getattr(m, "weight", None)
            if not isinstance(fq, FakeQuantizeBase) or not isinstance(weight, torch.Tensor):
                continue
            w = weight.detach()
            bn = getattr(m, "bn", None)
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.running_var is not None and (
                bn.weight is not None
            ):
                factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
                w = w * factor.reshape([-1] + [1] * (w.dim() - 1))
            fq(w)


# --- what torch.ao's Conv+BN fusion must see: plain BatchNorm modules right after the convolution -----------------

_PLAIN_BATCH_NORMS: tuple[type[torch.nn.Module], ...] = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
)
_PROBE_SHAPES: dict[type[torch.nn.Module], tuple[int, ...]] = {
    torch.nn.BatchNorm1d: (2, -1, 5), torch.nn.BatchNorm2d: (2, -1, 5, 5), torch.nn.BatchNorm3d: (2, -1, 3, 3, 3),
}


class TracedIdentity(torch.nn.Identity):
    """``nn.Identity`` that torch.fx traces through (its class lives outside ``torch.nn``, so the quantization
    tracer does not keep it as a leaf): no node at all in the traced graph, so an ``Identity`` placeholder between
    a convolution and its batch norm, or between a batch norm and its ReLU (timm's ``drop_block``, ``aa``), does
    not hide the pattern from torch.ao's fusion."""

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # nn.Identity names it input
        return input


def _plain_batch_norm_type(m: torch.nn.Module) -> type[torch.nn.Module] | None:
    for cls in _PLAIN_BATCH_NORMS:
        if isinstance(m, cls):
            return cls
    return None


def _plain_copy(m: Any, cls: type[torch.nn.Module]) -> Any:
    """A ``cls`` batch norm holding ``m``'s very Parameters and buffers (nothing copied)."""
    plain: Any = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                     track_running_stats=m.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(plain, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain._buffers[name] = m._buffers.get(name)
    plain.train(m.training)
    return plain


def _batch_norm_replacement(m: Any) -> tuple[torch.nn.Module | None, str]:
    """A plain batch norm followed by ``m``'s non-Identity child modules (as timm's ``BatchNormAct2d``: dropout,
    then the activation) when that computes what ``m`` computes in eval mode on a probe input, else None and why."""
    cls = _plain_batch_norm_type(m)
    if cls is None:
        return None, "not a BatchNorm1d/2d/3d subclass"
    if m.running_mean is None or m.running_var is None:
        return None, "no running statistics"
    plain = _plain_copy(m, cls)
    rest = [c for c in m.children() if not isinstance(c, torch.nn.Identity)]
    replacement: torch.nn.Module = torch.nn.Sequential(plain, *rest) if rest else plain
    shape = tuple(m.num_features if d == -1 else d for d in _PROBE_SHAPES[cls])
    ref = m.weight if m.weight is not None else m.running_mean
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(ref.device, ref.dtype)
    modes = [(mod, mod.training) for mod in (m, *m.modules(), *replacement.modules())]
    try:
        for mod, _ in modes:
            mod.training = False
        with torch.no_grad():
            same = torch.allclose(m(probe), replacement(probe), rtol=1e-5, atol=1e-6)
    except Exception as exc:  # a forward the probe cannot run: leave the module as it is
        return None, f"its forward cannot be checked on a probe input ({type(exc).__name__})"
    finally:
        for mod, mode in modes:
            mod.training = mode
    if not same:
        return None, "its forward is not a batch norm followed by its child modules"
    return replacement, ""


def swap_batch_norm_subclasses(model: torch.nn.Module) -> tuple[list[str], dict[str, str]]:
    """Make every batch norm torch.ao can fold a plain one, in place, before preparing.

    - A subclass of ``BatchNorm1d/2d/3d`` (timm's ``BatchNormAct2d``, ``FrozenBatchNorm``-like classes) is traced
      into by torch.fx: its ``F.batch_norm`` call stays a separate, float op, with the training flag of the
      moment baked in (an export then keeps ``BatchNormalization`` with ``training_mode=1``). It becomes a plain
      batch norm sharing its Parameters and buffers, followed by its non-Identity children (dropout, activation),
      when that is what its forward computes (checked on a probe input in eval mode).
    - ``nn.Identity`` becomes :class:`TracedIdentity` (no node in the traced graph), so it no longer separates a
      convolution from its batch norm or a batch norm from its activation.

    Returns the qualified names of the batch norms swapped, and those left as they were with the reason (the
    wrapper warns about them).
    """
    swapped: list[str] = []
    kept: dict[str, str] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is torch.nn.Identity:
                setattr(parent, child_name, TracedIdentity())
                continue
            if not isinstance(child, torch.nn.modules.batchnorm._BatchNorm) or type(child) in _PLAIN_BATCH_NORMS or (
                    isinstance(child, torch.nn.SyncBatchNorm)):
                continue
            replacement, reason = _batch_norm_replacement(child)
            if replacement is None:
                kept[full] = f"{type(child).__name__}: {reason}"
                continue
            setattr(parent, child_name, replacement)
            swapped.append(full)
    return swapped, kept
