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
  kernel, and `reference_attention_at_positions`, the same in plain torch,
  which defines the semantics and checks the kernel.

The Triton kernel is FlashAttention over query tiles.  A tile holds up to
`block_m // group` kept queries of one request together with the `group` query
heads that share one KV head (packed GQA), so each K/V tile read from the cache
serves `block_m` rows of a `tl.dot`.  Keys are walked `block_n` at a time with
an online softmax; each row's causal limit is its own query's position, so a
tile needs no contiguous positions.  When tiles and KV heads alone are too few
programs to fill the GPU (few kept queries, long contexts), each tile's key
range is also split over programs whose partial results a second kernel merges
(flash-decoding).

Cache layout (vLLM's FlashAttention / Triton / CPU allocation): key and value
caches are strided views of shape [num_blocks, block_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

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


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch: `block_m` rows (kept queries x the query heads of one KV
    head), `block_n` keys per step, and `num_splits` programs per tile along the keys."""

    block_m: int = 64
    block_n: int = 64
    num_splits: int = 1
    num_warps: int = 8
    num_stages: int = 2


def launch_config(num_queries: int, num_requests: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  max_context: int, device: torch.device) -> LaunchConfig:
    """Tile sizes from shapes alone (no device sync).

    Tiles shrink when requests have few kept queries each (decode-like steps), and the
    keys are split when tiles x KV heads would leave most of the GPU idle."""
    group = num_heads // num_kv_heads
    rows_per_request = -(-num_queries // max(num_requests, 1)) * group
    block_m = min(64, max(16, _next_power_of_2(rows_per_request)))
    block_n = 64 if head_dim <= 64 else 32
    num_warps = 8 if block_m >= 64 else 4  # sm_90 builds of these tiles then need no spills
    programs = max(1, max_tiles(num_queries, num_requests, block_m // group) * num_kv_heads)
    target = 2 * _multiprocessors(device)
    num_splits = 1
    if programs < target:
        useful = -(-max_context // (4 * block_n))  # each split walks at least 4 key tiles
        num_splits = max(1, min(16, -(-target // programs), useful))
    return LaunchConfig(block_m=block_m, block_n=block_n, num_splits=num_splits, num_warps=num_warps)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: only the split logic matters there


def max_tiles(num_queries: int, num_requests: int, queries_per_tile: int) -> int:
    """An upper bound on the query tiles, known without reading the requests: each
    request's last tile may be partial."""
    return num_queries // queries_per_tile + min(num_queries, num_requests)


def query_tiles(requests: Tensor, num_requests: int, queries_per_tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the kept queries into tiles of one request each, on the device, without a sync.

    Returns `order` [N] (query indices, grouped by request, step order kept within one),
    and per tile (padded to `max_tiles`) its first slot in `order` and its length (0: unused)."""
    n, device = len(requests), requests.device
    order = torch.argsort(requests, stable=True)
    grouped = requests[order]
    slot = torch.arange(n, device=device)
    new_request = torch.ones(n, dtype=torch.bool, device=device)
    new_request[1:] = grouped[1:] != grouped[:-1]
    request_start = torch.where(new_request, slot, 0).cummax(0).values
    opens_tile = (slot - request_start) % queries_per_tile == 0
    tile = opens_tile.cumsum(0) - 1
    num_tiles = max_tiles(n, num_requests, queries_per_tile)
    spare = torch.where(opens_tile, tile, num_tiles)  # non-openers write to a discarded slot
    tile_start = torch.zeros(num_tiles + 1, dtype=torch.int32, device=device).scatter_(0, spare, slot.int())
    tile_len = torch.zeros(num_tiles, dtype=torch.int32, device=device).scatter_add_(
        0, tile, torch.ones(n, dtype=torch.int32, device=device))
    return order, tile_start[:num_tiles], tile_len


def _interpreted(kernel) -> bool:
    """Whether Triton's CPU interpreter runs `kernel`: it multiplies bfloat16 dot operands
    as their raw bits, so there the dots take float32 copies of the same bfloat16 values."""
    return type(kernel).__name__ == "InterpretedFunction"


def attention_at_positions(
    q: Tensor, positions: Tensor, requests: Tensor, block_table: Tensor,
    key_cache: Tensor, value_cache: Tensor, scale: float,
) -> Tensor:
    """Triton version of `reference_attention_at_positions` (GPU, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("attention_at_positions needs Triton")
    num_queries, num_heads, head_dim = q.shape
    config = launch_config(num_queries, block_table.shape[0], num_heads, key_cache.shape[2], head_dim,
                           block_table.shape[1] * key_cache.shape[1], q.device)
    return tiled_attention(q, positions, requests, block_table, key_cache, value_cache, scale, config)


def tiled_attention(
    q: Tensor, positions: Tensor, requests: Tensor, block_table: Tensor,
    key_cache: Tensor, value_cache: Tensor, scale: float, config: LaunchConfig,
) -> Tensor:
    """`attention_at_positions` with explicit tile sizes."""
    num_queries, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    queries_per_tile = config.block_m // group
    if queries_per_tile == 0:
        raise ValueError(f"block_m {config.block_m} holds no query of {group} heads per KV head")
    out = torch.empty_like(q)
    if num_queries == 0:
        return out
    order, tile_start, tile_len = query_tiles(requests, block_table.shape[0], queries_per_tile)
    head_dim_pad = max(16, _next_power_of_2(head_dim))  # tl.dot takes 16 at least
    splits = config.num_splits
    if splits > 1:
        part_acc = torch.empty(num_queries, num_heads, splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_queries, num_heads, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused
    _tile_attention_kernel[(len(tile_len), num_kv_heads, splits)](
        q, key_cache, value_cache, out, part_acc, part_max, part_sum,
        positions, requests, order, tile_start, tile_len, block_table, scale * math.log2(math.e),
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(), *block_table.stride(),
        GROUP=group, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # no TF32 for float32
        UPCAST_DOTS=q.dtype == torch.bfloat16 and _interpreted(_tile_attention_kernel),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        splits_pad = _next_power_of_2(splits)
        block_r = max(1, 4096 // (splits_pad * head_dim_pad))  # rows per program: a few thousand partials
        num_rows = num_queries * num_heads
        _merge_splits_kernel[(triton.cdiv(num_rows, block_r),)](
            out, part_acc, part_max, part_sum, num_rows, *out.stride(),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits,
            SPLITS_PAD=splits_pad, BLOCK_R=block_r,
        )
    return out


if triton is not None:

    @triton.jit
    def _attend_keys(
        q, acc, m, l, K, V, table_row, stride_bp, kv_head, start, last, pos, dims, dim_ok,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        qk_scale,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        P_DTYPE: tl.constexpr,
    ):
        """One online-softmax step over keys start..start+BLOCK_N (log2 domain); CAUSAL masks
        each row past its own position, otherwise every key is below every row's.  The
        probabilities enter the second dot rounded to the inputs' dtype (P_DTYPE)."""
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys <= last
        page = tl.load(table_row + keys // BLOCK_SIZE * stride_bp, mask=key_ok, other=0).to(tl.int64)
        slot = keys % BLOCK_SIZE
        kt = tl.load(K + page[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                     + dims[:, None] * stride_kd, mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet in this split
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        v = tl.load(V + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                    + dims[None, :] * stride_vd, mask=key_ok[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(P_DTYPE).to(q.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l * alpha + tl.sum(p, axis=1)

    @triton.jit
    def _tile_attention_kernel(
        Q, K, V, Out, PartAcc, PartMax, PartSum,
        Positions, Requests, Order, TileStart, TileLen, BlockTable, qk_scale,
        stride_qn, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_on, stride_oh, stride_od, stride_bt, stride_bp,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    ):
        """One query tile, one KV head, one share of the tile's keys.

        Row r of the tile is query r // GROUP of the tile at query head
        kv_head * GROUP + r % GROUP."""
        tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest contexts start first
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        tile_len = tl.load(TileLen + tile)
        if tile_len == 0:
            return
        first_slot = tl.load(TileStart + tile)
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows // GROUP < tile_len
        query = tl.load(Order + first_slot + rows // GROUP, mask=row_ok, other=0)
        head = kv_head * GROUP + rows % GROUP
        pos = tl.load(Positions + query, mask=row_ok, other=0).to(tl.int32)
        last = tl.max(tl.where(row_ok, pos, 0))
        pos = tl.where(row_ok, pos, last)  # padding rows: any position with keys, never stored
        unmasked_end = (tl.min(pos) + 1) // BLOCK_N * BLOCK_N  # tiles below it are visible to all rows
        request = tl.load(Requests + tl.load(Order + first_slot)).to(tl.int64)
        table_row = BlockTable + request * stride_bt

        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q = tl.load(Q + query[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :] * stride_qd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST_DOTS:
            q = q.to(tl.float32)

        key_tiles = tl.cdiv(last + 1, BLOCK_N)
        tiles_per_split = tl.cdiv(key_tiles, NUM_SPLITS)
        lo = split * tiles_per_split * BLOCK_N
        hi = tl.minimum(lo + tiles_per_split * BLOCK_N, key_tiles * BLOCK_N)
        mid = tl.maximum(lo, tl.minimum(hi, unmasked_end))

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        for start in range(lo, mid, BLOCK_N):
            acc, m, l = _attend_keys(q, acc, m, l, K, V, table_row, stride_bp, kv_head, start, last, pos, dims, dim_ok,
                                     stride_kb, stride_ks, stride_kh, stride_kd,
                                     stride_vb, stride_vs, stride_vh, stride_vd, qk_scale,
                                     BLOCK_N, BLOCK_SIZE, False, DOT_PRECISION, Q.dtype.element_ty)
        for start in range(mid, hi, BLOCK_N):
            acc, m, l = _attend_keys(q, acc, m, l, K, V, table_row, stride_bp, kv_head, start, last, pos, dims, dim_ok,
                                     stride_kb, stride_ks, stride_kh, stride_kd,
                                     stride_vb, stride_vs, stride_vh, stride_vd, qk_scale,
                                     BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION, Q.dtype.element_ty)

        if NUM_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(Out + query[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :] * stride_od,
                     out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        else:
            part = (query * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split  # [N, H, splits]
            tl.store(PartMax + part, m, mask=row_ok)
            tl.store(PartSum + part, l, mask=row_ok)
            tl.store(PartAcc + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _merge_splits_kernel(
        Out, PartAcc, PartMax, PartSum, num_rows, stride_on, stride_oh, stride_od,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """BLOCK_R (query, head) rows: rescale each split's partial sums to the row's common
        maximum and normalise.  Split 0 holds key 0, so the maximum is finite."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        splits = tl.arange(0, SPLITS_PAD)
        part = rows[:, None] * NUM_SPLITS + splits[None, :]  # [BLOCK_R, SPLITS_PAD]
        part_ok = row_ok[:, None] & (splits < NUM_SPLITS)[None, :]
        m = tl.load(PartMax + part, mask=part_ok, other=float("-inf"))
        l = tl.load(PartSum + part, mask=part_ok, other=0.0)
        dims = tl.arange(0, HEAD_DIM_PAD)
        acc = tl.load(PartAcc + part[:, :, None] * HEAD_DIM_PAD + dims[None, None, :], mask=part_ok[:, :, None],
                      other=0.0)
        m_row = tl.max(m, axis=1)
        weight = tl.exp2(m - tl.where(row_ok, m_row, 0.0)[:, None])
        total = tl.where(row_ok, tl.sum(l * weight, axis=1), 1.0)
        out = tl.sum(acc * weight[:, :, None], axis=1) / total[:, None]  # [BLOCK_R, HEAD_DIM_PAD]
        query, head = rows // NUM_HEADS, rows % NUM_HEADS
        tl.store(Out + query[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])
