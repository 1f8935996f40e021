"""Attention for a routed block's kept queries on the attention backend vLLM picked.

Each adapter reads the cache and settings of a vLLM attention layer and calls a
kernel of `ftp_vllm.kernels.attention` (or vLLM's own) with the kept queries at
their true positions.  `kept_attention` picks the adapter for a layer, or none:
then the routed block runs the stock attention call for every token and keeps
the kept tokens' rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ftp_vllm.kernels import attention

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None

# layer, q [N, H, D], kept [N] (indices in the step), requests [N], positions [N], block_table -> [N, H, D]
KeptAttention = Callable[[object, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def cpu_attention(layer, q: Tensor, kept: Tensor, requests: Tensor, positions: Tensor,
                  block_table: Tensor) -> Tensor:
    """vLLM's CPU attention kernel over runs of consecutive kept queries (see `query_runs`)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    impl = layer.impl
    query_start_loc, seq_lens, run_requests = attention.query_runs(kept, requests, positions)
    num_blocks, num_kv_heads, block_size, _ = layer.kv_cache.shape
    key_cache, value_cache = layer.kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size, seq_lens=seq_lens, dtype=q.dtype, query_start_loc=query_start_loc,
        causal=True, sliding_window_size=impl.sliding_window, isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype,
    )
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=impl.scale, causal=True,
        alibi_slopes=impl.alibi_slopes, sliding_window=impl.sliding_window,
        block_table=block_table[run_requests], softcap=impl.logits_soft_cap,
        scheduler_metadata=scheduler_metadata, s_aux=impl.sinks,
        k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=impl.kv_cache_dtype,
    )
    return out


def triton_attention(layer, q: Tensor, kept: Tensor, requests: Tensor, positions: Tensor,
                     block_table: Tensor) -> Tensor:
    """The Triton kernel over vLLM's GPU cache, [blocks, kv_heads, block_size, 2 * head_dim]."""
    key_cache, value_cache = layer.kv_cache.transpose(1, 2).split(layer.impl.head_size, dim=-1)
    return attention.attention_at_positions(q, positions, requests, block_table, key_cache, value_cache,
                                            layer.impl.scale)


def kept_attention(layer) -> KeptAttention | None:
    """The adapter for vLLM attention `layer`'s backend, or None where there is none: a backend
    that writes the cache inside its attention call (a skipped token's K/V needs the write
    alone), or a GPU attention with features the Triton kernel lacks (sliding window, ALiBi,
    soft cap, sinks, a quantized cache)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = layer.impl
    if layer.attn_backend.forward_includes_kv_cache_update:
        return None
    if isinstance(impl, CPUAttentionBackendImpl):
        return cpu_attention
    plain = (getattr(impl, "sliding_window", None) in (None, -1, (-1, -1)) and impl.alibi_slopes is None
             and not getattr(impl, "logits_soft_cap", 0) and getattr(impl, "sinks", None) is None
             and impl.kv_cache_dtype == "auto" and layer.kv_cache.dim() == 4)
    if layer.kv_cache.is_cuda and triton is not None and plain:
        return triton_attention
    return None
