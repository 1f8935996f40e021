"""Attention for the kept queries of a step, at their true positions, over the paged KV cache.

A routed block computes attention only for the tokens it keeps.  Those are not
contiguous, so the usual "the step's queries are the last `n` tokens of the
sequence" convention of attention kernels does not hold.  Two ways round it:

* `query_runs` cuts each request's kept queries into runs of consecutive
  positions; a run is a valid query block for any causal varlen kernel (its
  last query is the sequence end, its length the query length).  FTP keeps the
  most recent tokens, so runs are long and few.  The CPU path feeds runs to
  vLLM's own CPU attention kernel.
* `attention_at_positions` takes each query's position explicitly: a Triton
  kernel (one program per query and KV head, online softmax over the
  request's pages), and `reference_attention_at_positions`, the same in plain
  torch, which defines the semantics and checks the kernel.

Cache layout (vLLM's FlashAttention / Triton / CPU allocation): key and value
caches are strided views of shape [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def query_runs(token_index: Tensor, requests: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Runs of kept queries at consecutive positions of one request.

    token_index, requests, positions: [N] of the kept queries, in step order.
    Returns query_start_loc [n_runs + 1] (int32), seq_lens [n_runs] (int32:
    each run's last position + 1) and the request of each run [n_runs]."""
    n = len(token_index)
    starts = torch.ones(n, dtype=torch.bool, device=token_index.device)
    starts[1:] = (token_index[1:] != token_index[:-1] + 1) | (requests[1:] != requests[:-1])
    first = starts.nonzero().squeeze(1)
    bounds = torch.cat([first, first.new_full((1,), n)])
    seq_lens = positions[bounds[1:] - 1] + 1
    return bounds.to(torch.int32), seq_lens.to(torch.int32), requests[first]


def reference_attention_at_positions(
    q: Tensor, positions: Tensor, requests: Tensor, block_table: Tensor,
    key_cache: Tensor, value_cache: Tensor, scale: float,
) -> Tensor:
    """q [N, H, D] -> [N, H, D]: query i attends to its request's cache entries 0..positions[i]."""
    num_heads, block_size, num_kv_heads = q.shape[1], key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(len(q)):
        ctx = torch.arange(int(positions[i]) + 1, device=q.device)
        blocks = block_table[requests[i], ctx // block_size].long()
        k = key_cache[blocks, ctx % block_size].float().repeat_interleave(group, dim=1)  # [S, H, D]
        v = value_cache[blocks, ctx % block_size].float().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,shd->hs", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hs,shd->hd", weights, v).to(q.dtype)
    return out


def attention_at_positions(
    q: Tensor, positions: Tensor, requests: Tensor, block_table: Tensor,
    key_cache: Tensor, value_cache: Tensor, scale: float,
) -> Tensor:
    """Triton version of `reference_attention_at_positions` (GPU, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("attention_at_positions needs Triton")
    num_queries, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_queries == 0:
        return out
    _attention_at_positions_kernel[(num_queries, num_kv_heads)](
        q, key_cache, value_cache, out, positions, requests, block_table, scale,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1), block_table.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )
    return out


if triton is not None:

    @triton.jit
    def _attention_at_positions_kernel(
        Q, K, V, O, Positions, Requests, BlockTable, scale,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    ):
        """One query token and one KV head: its GROUP query heads, page by page."""
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        position = tl.load(Positions + token)
        request = tl.load(Requests + token)
        heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
        head_ok = tl.arange(0, GROUP_PAD) < GROUP
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q = tl.load(Q + token * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                    mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
        offsets = tl.arange(0, BLOCK_SIZE)
        for page in range(0, position // BLOCK_SIZE + 1):
            block = tl.load(BlockTable + request * stride_bt + page).to(tl.int64)
            ctx = page * BLOCK_SIZE + offsets
            ok = ctx <= position
            k = tl.load(K + block * stride_kb + offsets[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                        mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(V + block * stride_vb + offsets[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                        mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / l[:, None]
        tl.store(O + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(O.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
