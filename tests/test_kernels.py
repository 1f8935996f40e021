"""Attention for kept queries at explicit positions: the torch reference, the Triton kernel
(under TRITON_INTERPRET=1 on the CPU) and vLLM's CPU kernel driven by query runs agree."""

import io
import os
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ftp_vllm.kernels.attention import (LaunchConfig, launch_config, max_tiles, query_runs, query_tiles,
                                        reference_attention_at_positions)

from .conftest import ROOT


def paged_case(seed=0, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, lengths=(37, 70, 5),
               keep=0.6):
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
    kept = (torch.rand(len(positions), generator=g) < keep).nonzero().squeeze(1)
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


def test_query_tiles_hold_one_request_each():
    requests = torch.tensor([1, 0, 0, 1, 1, 1, 0, 2, 1])  # interleaved in step order
    order, tile_start, tile_len = query_tiles(requests, num_requests=3, queries_per_tile=2)
    assert len(tile_len) == max_tiles(9, 3, 2)
    assert sorted(order.tolist()) == list(range(9))
    tiles = [order[s:s + n].tolist() for s, n in zip(tile_start.tolist(), tile_len.tolist()) if n]
    assert tiles == [[1, 2], [6], [0, 3], [4, 5], [8], [7]]


def test_launch_config_splits_keys_only_when_programs_are_few():
    cpu = torch.device("cpu")  # 4 multiprocessors assumed: target 8 programs
    prefill = launch_config(4096, 1, 9, 3, 64, 8192, cpu)
    assert prefill.num_splits == 1 and prefill.block_m == 64
    decode = launch_config(1, 1, 9, 3, 64, 8192, cpu)
    assert decode.block_m == 16 and decode.num_splits > 1
    assert launch_config(1, 1, 9, 3, 64, 64, cpu).num_splits == 1  # too few keys to share


def serve_interpreted():
    """Run the Triton kernel on the cases a test process sends, in this process, where
    TRITON_INTERPRET=1 was set before Triton compiled anything.  Frames: 8-byte length
    + `torch.save` bytes; a request is (function name, args), a reply (ok, result)."""
    from ftp_vllm.kernels import attention

    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the frames
    while header := stdin.read(8):
        name, args = torch.load(io.BytesIO(stdin.read(struct.unpack("<Q", header)[0])), weights_only=False)
        try:
            reply = (True, getattr(attention, name)(*args))
        except Exception as e:  # the test shows it
            reply = (False, f"{type(e).__name__}: {e}")
        buf = io.BytesIO()
        torch.save(reply, buf)
        stdout.write(struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
        stdout.flush()


@pytest.fixture(scope="module")
def interpreted():
    """Calls a function of `ftp_vllm.kernels.attention` in one process running Triton's
    interpreter (the flag must be set before Triton compiles, so not in this process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.test_kernels import serve_interpreted; serve_interpreted()"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(name, *args):
        buf = io.BytesIO()
        torch.save((name, args), buf)
        proc.stdin.write(struct.pack("<Q", len(buf.getvalue())) + buf.getvalue())
        proc.stdin.flush()
        header = proc.stdout.read(8)
        assert header, "the interpreter process died (its stderr is above)"
        ok, result = torch.load(io.BytesIO(proc.stdout.read(struct.unpack("<Q", header)[0])), weights_only=False)
        assert ok, result
        return result

    yield call
    proc.stdin.close()
    proc.wait(timeout=60)


def vllm_views(c, dtype=torch.float32):
    """K/V as the adapter passes them: strided views of vLLM's cache allocation
    [blocks, kv_heads, block_size, 2 * head_dim]."""
    kv = torch.cat([c.k_plain, c.v_plain], dim=-1).transpose(1, 2).contiguous().to(dtype)
    return kv.transpose(1, 2).split(c.k_plain.shape[-1], dim=-1)


def kernel_and_reference(interpreted, c, config=None, dtype=torch.float32):
    k_view, v_view = vllm_views(c, dtype)
    args = (c.q.to(dtype), c.positions, c.requests, c.block_table, k_view, v_view, c.scale)
    got = interpreted("attention_at_positions", *args) if config is None else \
        interpreted("tiled_attention", *args, config)
    want = reference_attention_at_positions(*args)
    return got, want


@pytest.mark.parametrize("seed,shape", [(0, (9, 3, 64, 16)), (1, (4, 4, 48, 8)), (2, (8, 2, 32, 16))])
def test_triton_kernel_equals_reference_under_interpreter(interpreted, seed, shape):
    """Several requests of different lengths over shuffled pages, random kept queries, GQA
    (and none), a head size that is not a power of two, the launch's own tile sizes."""
    got, want = kernel_and_reference(interpreted, paged_case(seed, *shape))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_kernel_takes_requests_in_any_order(interpreted):
    c = paged_case(3, lengths=(20, 33, 9))
    shuffle = torch.randperm(len(c.q), generator=torch.Generator().manual_seed(3))
    c.q, c.positions, c.requests = c.q[shuffle], c.positions[shuffle], c.requests[shuffle]
    got, want = kernel_and_reference(interpreted, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_kernel_over_kept_queries_spanning_several_tiles(interpreted):
    c = paged_case(4, lengths=(64,), keep=0.5)
    config = LaunchConfig(block_m=16, block_n=16)  # 5 queries of 3 heads per tile
    _, _, tile_len = query_tiles(c.requests, 1, 16 // 3)
    assert (tile_len > 0).sum() >= 5
    got, want = kernel_and_reference(interpreted, c, config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_kernel_with_keys_split_over_programs(interpreted):
    """Few queries over long contexts, the keys shared by 4 programs per tile: the first
    query sees only the first split's keys, the others' partial sums are empty for it."""
    c = paged_case(5, lengths=(150, 97))
    c.requests, c.positions = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([3, 120, 149, 50, 96])
    c.q = c.q[:5]
    got, want = kernel_and_reference(interpreted, c, LaunchConfig(block_m=16, block_n=16, num_splits=4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_in_half_precision(interpreted, dtype):
    """Within a few units in the last place of the float32-computed reference, rounded."""
    got, want = kernel_and_reference(interpreted, paged_case(6), dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_triton_kernel_without_queries(interpreted):
    c = paged_case(7)
    c.q, c.positions, c.requests = c.q[:0], c.positions[:0], c.requests[:0]
    got, _ = kernel_and_reference(interpreted, c)
    assert got.shape == (0, 9, 64)


def test_vllm_cpu_kernel_over_query_runs_equals_reference():
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from ftp_vllm.kernels.backends import cpu_attention

    c = paged_case(block_size=32)
    num_kv_heads, head_dim = c.keys.shape[1:]
    isa = _get_attn_isa(torch.float32, c.block_size, head_dim, "auto")
    kv_cache = torch.zeros(c.num_blocks, num_kv_heads, c.block_size, 2 * head_dim)
    key_cache, value_cache = kv_cache.view(c.num_blocks, num_kv_heads, 2 * c.block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(c.keys, c.values, key_cache, value_cache, c.slots, isa)
    impl = SimpleNamespace(num_heads=c.q.shape[1], num_kv_heads=num_kv_heads, head_size=head_dim, scale=c.scale,
                           sliding_window=-1, alibi_slopes=None, logits_soft_cap=0, sinks=None, kv_cache_dtype="auto")
    layer = SimpleNamespace(impl=impl, kv_cache=kv_cache, isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    got = cpu_attention(layer, c.q, c.kept, c.requests, c.positions, c.block_table)
    want = reference_attention_at_positions(c.q, c.positions, c.requests, c.block_table, c.k_plain, c.v_plain, c.scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
