"""Quantization-friendly module swaps: ``nn.MultiheadAttention`` as Linear, MatMul, Softmax, MatMul, Linear.

torch.fx treats ``nn.MultiheadAttention`` as one opaque leaf, so it would stay float and export without Q/DQ; the
wrappers swap it for :class:`QuantFriendlyMultiheadAttention` before preparing (same parameters, no copy).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["QuantFriendlyMultiheadAttention", "swap_attention_modules"]

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
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
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
