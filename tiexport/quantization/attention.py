"""Quantization-friendly attention: ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention`` as MatMul,
Softmax, MatMul.

torch.fx treats ``nn.MultiheadAttention`` as one opaque leaf, so it would stay float and export without Q/DQ; the
wrappers swap it for :class:`QuantFriendlyMultiheadAttention` before preparing (same parameters, no copy).
``F.scaled_dot_product_attention`` (timm's ``Attention``, torchvision's ViT through MHA) is one opaque function to
torch.ao, which leaves the attention between its inputs and output float; while the wrappers trace the model,
:func:`traceable_sdpa` puts :func:`sdpa_decomposed` in its place, so the traced graph has the MatMul -> Softmax ->
MatMul that torch.ao observes and TIDL quantizes (TIDL's per-layer table: MatMul and Softmax need Q/DQ).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["QuantFriendlyMultiheadAttention", "sdpa_decomposed", "swap_attention_modules", "traceable_sdpa"]

log = logging.getLogger(__name__)


class QuantFriendlyMultiheadAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` written out as Linear, MatMul, Softmax, MatMul, Linear so torch.fx can trace it.

    torch.fx treats ``nn.MultiheadAttention`` as one opaque leaf, so it would stay float and export without Q/DQ.
    This module computes the same function from the same ``Parameter`` objects (no copy): the packed input
    projection is one Linear whose weight *is* ``in_proj_weight``, the output projection reuses ``out_proj``'s
    parameters. Supported: self- and cross-attention with equal embedding sizes, ``batch_first`` either way, float
    additive ``attn_mask``, boolean ``key_padding_mask``, ``is_causal``, dropout on the attention weights.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        embed_dim, num_heads = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = mha.batch_first
        self.scaling = float(self.head_dim) ** -0.5
        has_bias = mha.in_proj_bias is not None
        # built on the meta device, then given the existing Parameters: nothing is allocated or copied
        self.in_proj = torch.nn.Linear(embed_dim, 3 * embed_dim, bias=has_bias, device="meta")
        self.in_proj.weight = mha.in_proj_weight
        if has_bias:
            self.in_proj.bias = mha.in_proj_bias
        out_bias = mha.out_proj.bias is not None
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=out_bias, device="meta")
        self.out_proj.weight = mha.out_proj.weight
        if out_bias:
            self.out_proj.bias = mha.out_proj.bias
        self.dropout = torch.nn.Dropout(mha.dropout)

    @staticmethod
    def supports(mha: torch.nn.MultiheadAttention) -> str | None:
        """None when the module can be swapped, else the reason it cannot."""
        if not mha._qkv_same_embed_dim:
            return "key/value embedding sizes differ from the query's"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        return None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attention = query is key and key is value
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target_len, _ = query.shape
        source_len = key.shape[1]
        e = self.embed_dim
        if self_attention:
            # constant slices, not chunk(): chunk exports as run-time shape arithmetic (TorchScript) or an
            # opset-18 Split (dynamo) that the opset-17 export cannot express
            qkv = self.in_proj(query)
            q, k, v = qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]
        else:
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e : 2 * e]
            v = self.in_proj(value)[..., 2 * e :]
        q = q.reshape(batch, target_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, source_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, source_len, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scaling
        if attn_mask is not None:
            scores = scores + attn_mask
        if is_causal:
            causal = torch.triu(torch.full((target_len, source_len), float("-inf"), device=scores.device), 1)
            scores = scores + causal
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, target_len, e)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def swap_attention_modules(model: torch.nn.Module) -> list[str]:
    """Swap every ``nn.MultiheadAttention`` of ``model`` (in place) for :class:`QuantFriendlyMultiheadAttention`
    where it supports the configuration; returns the qualified names swapped (the others are logged)."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.MultiheadAttention:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            reason = QuantFriendlyMultiheadAttention.supports(child)
            if reason is not None:
                log.warning("%s: MultiheadAttention stays float (%s)", full, reason)
                continue
            setattr(parent, child_name, QuantFriendlyMultiheadAttention(child))
            swapped.append(full)
    if swapped:
        log.info("swapped %d MultiheadAttention module(s) for traceable ones: %s", len(swapped), ", ".join(swapped))
    return swapped


def sdpa_decomposed(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                    *, shapes: tuple[int, int, int, int, int] | None = None) -> Any:
    """``F.scaled_dot_product_attention`` written out: ``softmax(q @ k^T * scale + mask) @ v``.

    ``shapes``: ``(query heads, key heads, query length, key length, head size)`` when the tensors are torch.fx
    proxies (recorded by :func:`traceable_sdpa` on a real forward): the scale is then a Python float, one constant
    Mul after the first MatMul, and the causal mask a constant. ``dropout_p`` is ignored: the wrappers calibrate
    and export the deterministic network (a non-zero value is logged). ``is_causal`` and a boolean or additive
    ``attn_mask`` are applied as torch does; ``enable_gqa`` repeats key and value heads."""
    if dropout_p:
        log.warning("scaled_dot_product_attention: dropout_p=%s ignored while quantizing", dropout_p)
    if shapes is None:
        if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):  # proxies without sizes
            return torch._C._nn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                             scale=scale, enable_gqa=enable_gqa)
        shapes = _sdpa_shapes(query, key)
    q_heads, k_heads, target_len, source_len, head_dim = shapes
    factor = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if enable_gqa and q_heads != k_heads:
        key = key.repeat_interleave(q_heads // k_heads, dim=-3)
        value = value.repeat_interleave(q_heads // k_heads, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        causal = torch.ones(target_len, source_len, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def _sdpa_shapes(query: Any, key: Any) -> tuple[int, int, int, int, int]:
    return (int(query.shape[-3]) if query.dim() > 2 else 1, int(key.shape[-3]) if key.dim() > 2 else 1,
            int(query.shape[-2]), int(key.shape[-2]), int(query.shape[-1]))


@contextmanager
def traceable_sdpa(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[int]:
    """While the wrappers trace ``model``: ``torch.nn.functional.scaled_dot_product_attention`` is
    :func:`sdpa_decomposed` (for calls that look it up on ``torch.nn.functional`` at run time, as timm and torch's
    own modules do). torch.fx traces with proxies, which have no sizes, so one eval-mode forward on the example
    inputs first records each call's head count, lengths and head size; the traced calls take them in order.
    Yields the number of calls recorded (0: the model does not call it, and nothing is patched)."""
    functional: Any = torch.nn.functional
    original = functional.scaled_dot_product_attention
    recorded: list[tuple[int, int, int, int, int]] = []

    def record(query: Any, key: Any, value: Any, *a: Any, **k: Any) -> Any:
        recorded.append(_sdpa_shapes(query, key))
        return original(query, key, value, *a, **k)

    modes = [(m, m.training) for m in model.modules()]
    functional.scaled_dot_product_attention = record
    try:
        for m, _ in modes:
            m.training = False
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # the real tracing below reports what is wrong with the model
        log.debug("recording attention shapes failed: %s", exc)
        recorded.clear()
    finally:
        functional.scaled_dot_product_attention = original
        for m, mode in modes:
            m.training = mode
    if not recorded:
        yield 0
        return
    queue = list(recorded)

    def decomposed(query: Any, key: Any, value: Any, *a: Any, **k: Any) -> Any:
        shapes = queue.pop(0) if queue else None
        return sdpa_decomposed(query, key, value, *a, shapes=shapes, **k)

    functional.scaled_dot_product_attention = decomposed
    try:
        yield len(recorded)
    finally:
        functional.scaled_dot_product_attention = original
