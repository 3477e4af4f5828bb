"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) on a prepared FX GraphModule.

Why: with one weight scale per tensor (TDA4VM, tidl.md §1: per-channel models fail to compile there; qconfig type
WT8SYMP2_AT8SYMP2), a layer whose output channels have very different weight ranges loses the small channels to
rounding. Depthwise convolutions after batch-norm folding are the usual victims: a channel with range 0.05 next to one
with range 5 gets two or three levels of the 255. Per-channel weights (the MMAv2 devices) do not have the problem.

What: for two layers A -> B where every op between them is positively homogeneous per channel (ReLU, LeakyReLU,
max/avg pooling, dropout, identity, fake-quant; and flatten after a global pooling), scaling A's output channel ``i``
by ``1 / s_i`` and B's input channel ``i`` by ``s_i`` leaves the float function unchanged.
``s_i = sqrt(r1_i / r2_i)``, with ``r1_i`` the range of A's (batch-norm folded) weights for output ``i`` and
``r2_i`` that of B's weights for input ``i``, makes both ranges ``sqrt(r1_i * r2_i)``. Chains (conv -> depthwise ->
pointwise) are swept repeatedly until the scales settle. A depthwise B takes the factor on its own channel's filter
(its output is then unchanged).

How the scaling is stored: on a fused Conv+BN module, on the batch norm's affine ``weight`` and ``bias`` (the module
fake-quantizes ``weight * gamma / std``, so the scaling reaches the quantized weight, and it survives batch-norm
statistics updates in QAT); elsewhere on the weight rows and bias. Pairs are skipped, with a debug log saying why,
when A's output has another user (residual Add, Concat), when an op between is not homogeneous (ReLU6, GELU, ...), for
transposed and grouped (non-depthwise) B, and for batch norms without affine parameters.

Run it before calibration: observers then see the equalized activations (their per-channel ranges change too).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.fx import GraphModule, Node

__all__ = ["EqualizationReport", "equalize_cross_layer", "find_pairs"]

log = logging.getLogger(__name__)

_PASSTHROUGH_MODULES: tuple[type[nn.Module], ...] = (
    FakeQuantizeBase, nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
_GLOBAL_POOLS: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
# Relative margin below a power-of-2 grid point (2**-16: ~500 float32 ulps, far below a quantization step).
_GRID_MARGIN = 2.0**-16

# positively homogeneous: f(s * x) = s * f(x) for s > 0 (LeakyReLU too: both slopes scale alike)
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.relu_, torch.nn.functional.leaky_relu)
_FLATTEN_FUNCTIONS = (torch.flatten,)


@dataclass
class EqualizationReport:
    """What :func:`equalize_cross_layer` did: the layer pairs it equalized and how far the scales moved."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    iterations: int = 0
    max_scale: float = 1.0
    """Largest factor applied to a channel over all sweeps (or its inverse, whichever is larger)."""

    def summary(self) -> str:
        if not self.pairs:
            return "no layer pairs to equalize"
        names = ", ".join(f"{a}->{b}" for a, b in self.pairs)
        return (f"{len(self.pairs)} pair(s) equalized in {self.iterations} sweep(s), largest channel factor "
                f"{self.max_scale:.3g}: {names}")


# ------------------------------------------------------------------------------------------------ layers
def _is_weighted(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.conv._ConvNd):
        return not m.transposed
    return isinstance(m, nn.Linear)


def _bn(m: Any) -> nn.modules.batchnorm._BatchNorm | None:
    bn = getattr(m, "bn", None)
    return bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None


def _out_factor(m: Any) -> torch.Tensor | None:
    """Per-output-channel factor the module applies to its weight before fake-quant (``gamma / std`` of a fused
    batch norm), or None."""
    bn = _bn(m)
    if bn is None or bn.running_var is None or bn.weight is None:
        return None  # nothing folded into the weight (such a first layer is not equalized: _can_scale_outputs)
    return bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


def _effective_weight(m: Any) -> torch.Tensor:
    w = m.weight.detach()
    factor = _out_factor(m)
    if factor is not None:
        w = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    return w


def _out_channels(m: Any) -> int:
    return int(m.weight.shape[0])


def _in_channels(m: Any) -> int:
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    return int(m.in_channels)


def _is_depthwise(m: Any) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _can_scale_outputs(m: Any) -> str:
    bn = _bn(m)
    if bn is not None and (bn.weight is None or bn.bias is None or bn.running_var is None):
        return "its batch norm has no affine parameters or running statistics"
    return ""


def _can_scale_inputs(m: Any) -> str:
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m):
        return f"it is a grouped convolution (groups={m.groups})"
    return ""


def _out_ranges(m: Any) -> torch.Tensor:
    return _effective_weight(m).abs().flatten(1).amax(dim=1)


def _in_ranges(m: Any) -> torch.Tensor:
    w = _effective_weight(m).abs()
    if _is_depthwise(m):
        return w.flatten(1).amax(dim=1)  # channel i's filter is the only one that reads input i
    return w.transpose(0, 1).flatten(1).amax(dim=1)


@torch.no_grad()
def _scale_outputs(m: Any, factor: torch.Tensor) -> None:
    bn = _bn(m)
    if bn is not None:
        assert bn.weight is not None and bn.bias is not None
        bn.weight.mul_(factor.to(bn.weight))
        bn.bias.mul_(factor.to(bn.bias))
        return
    m.weight.mul_(factor.reshape(-1, *([1] * (m.weight.dim() - 1))).to(m.weight))
    if getattr(m, "bias", None) is not None:
        m.bias.mul_(factor.to(m.bias))


@torch.no_grad()
def _scale_inputs(m: Any, factor: torch.Tensor) -> None:
    w = m.weight
    if _is_depthwise(m):
        w.mul_(factor.reshape(-1, *([1] * (w.dim() - 1))).to(w))
    else:
        w.mul_(factor.reshape(1, -1, *([1] * (w.dim() - 2))).to(w))


# ------------------------------------------------------------------------------------------------ pairs
def _passthrough(node: Node, modules: dict[str, nn.Module], collapsed: bool) -> tuple[bool, bool, str]:
    """(is homogeneous per channel, spatial dims collapsed to 1 after it, why not)."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if isinstance(m, _PASSTHROUGH_MODULES):
            return True, collapsed, ""
        if isinstance(m, _GLOBAL_POOLS):
            size = m.output_size
            ones = all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
            return ones, ones, "" if ones else f"{type(m).__name__} to {size}"
        return False, collapsed, f"{node.target} ({type(m).__name__}) is not homogeneous per channel"
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return True, collapsed, ""
        if node.target in _FLATTEN_FUNCTIONS:
            return _flatten(node, collapsed)
        return False, collapsed, f"{node.name} ({getattr(node.target, '__name__', node.target)}) is not homogeneous"
    if node.op == "call_method":
        if node.target in ("relu", "relu_", "leaky_relu"):
            return True, collapsed, ""
        if node.target == "flatten":
            return _flatten(node, collapsed)
        return False, collapsed, f"{node.name} (.{node.target}) is not homogeneous"
    return False, collapsed, f"{node.name} ({node.op})"


def _flatten(node: Node, collapsed: bool) -> tuple[bool, bool, str]:
    """``flatten(x, 1)`` keeps channel ``i`` at feature ``i`` only when the spatial dims were pooled to 1."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    ok = bool(collapsed and start == 1)
    return ok, collapsed, "" if ok else "flatten that mixes channels with spatial positions"


def find_pairs(gm: GraphModule) -> list[tuple[str, str]]:
    """Layer pairs (A, B) whose channels can be rescaled against each other, in graph order."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    pairs: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_weighted(modules.get(str(node.target), nn.Identity())):
            continue
        a = modules[str(node.target)]
        cur, collapsed, why = node, False, ""
        while True:
            if len(cur.users) != 1:
                why = f"{cur.name} has {len(cur.users)} users"
                break
            nxt = next(iter(cur.users))
            target = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if target is not None and _is_weighted(target):
                if not nxt.args or nxt.args[0] is not cur:
                    why = f"{nxt.target} reads it as a second argument"
                elif _in_channels(target) != _out_channels(a):
                    why = f"{nxt.target} reads {_in_channels(target)} channels, {node.target} makes {_out_channels(a)}"
                elif isinstance(target, nn.Linear) and cur is not node and not collapsed:
                    why = f"{nxt.target} is a Linear after ops that keep spatial dims"
                else:
                    why = _can_scale_outputs(a) or _can_scale_inputs(target)
                    if not why:
                        pairs.append((str(node.target), str(nxt.target)))
                break
            ok, collapsed, why = _passthrough(nxt, modules, collapsed)
            if not ok:
                break
            cur = nxt
        if why:
            log.debug("cross-layer equalization: no pair after %s: %s", node.target, why)
    return pairs


def equalize_cross_layer(gm: GraphModule, *, max_sweeps: int = 20, tolerance: float = 1e-3,
                         power_of_2_grid: float | None = None, headroom: float = 1.0) -> EqualizationReport:
    """Equalize every eligible layer pair of ``gm`` in place (see the module docstring); returns what it did.

    Sweeps over all pairs until no channel factor of a sweep differs from 1 by more than ``tolerance`` (at most
    ``max_sweeps``). ``power_of_2_grid``: the largest weight code (127) when weights get power-of-two scales; each
    pair's common factor then puts its first layer's largest weight at ``headroom`` times a point of the
    power-of-two grid (see below). The float function of ``gm`` is unchanged up to float rounding.
    """
    pairs = find_pairs(gm)
    report = EqualizationReport(pairs=pairs)
    if not pairs:
        return report
    modules = dict(gm.named_modules(remove_duplicate=False))
    total = {pair: torch.ones(_out_channels(modules[pair[0]]), dtype=torch.float64) for pair in pairs}
    for sweep in range(1, max_sweeps + 1):
        report.iterations = sweep
        moved = 0.0
        for pair in pairs:
            a, b = modules[pair[0]], modules[pair[1]]
            r1, r2 = _out_ranges(a).double(), _in_ranges(b).double()
            ok = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
            s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), torch.ones_like(r1))
            _scale_outputs(a, (1.0 / s).float())
            _scale_inputs(b, s.float())
            total[pair] *= s.cpu()  # the model may live on a GPU; the bookkeeping stays on the host
            moved = max(moved, float(torch.log(s).abs().max()))
        if moved <= math.log1p(tolerance):
            break
    if power_of_2_grid is not None:
        # One degree of freedom is left per pair: a common factor c on all its channels. Spend it on A's weight
        # grid: with a power-of-two scale ``2**ceil(log2(max|w| / qmax))`` a layer whose largest weight sits just
        # above ``qmax * 2**k`` wastes almost a bit; scaling A down by c in [1, 2) lands it on ``qmax * 2**k``
        # exactly (times ``headroom``) and moves the slack to B (the last layer of a chain keeps it). In graph
        # order, so that a layer that is B of one pair and A of the next ends up on its grid.
        for pair in pairs:
            a, b = modules[pair[0]], modules[pair[1]]
            top = float(_out_ranges(a).max())
            if not (top > 0 and math.isfinite(top)):
                continue
            # a hair below the grid point: the observer's float32 max|w| / qmax of weights rescaled in float32 lands
            # within a few ulps of it, and one ulp above 2**k makes the power-of-2 ceiling 2**(k+1), a doubled step
            target = headroom * (1.0 - _GRID_MARGIN)
            grid = power_of_2_grid * 2.0 ** math.floor(math.log2(top / (power_of_2_grid * target)))
            c = top / (grid * target)
            if c > 1.0 + 1e-6:
                _scale_outputs(a, torch.full((_out_channels(a),), 1.0 / c))
                _scale_inputs(b, torch.full((_in_channels(b),), c))
                total[pair] *= c
    report.max_scale = max(float(torch.maximum(t, 1.0 / t).max()) for t in total.values())
    log.info("cross-layer equalization: %s", report.summary())
    return report
