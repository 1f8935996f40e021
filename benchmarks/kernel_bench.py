"""The kept-query attention kernel against PyTorch's scaled-dot-product attention, on one GPU.

    python benchmarks/kernel_bench.py                      # time it: prompts of 1k-8k tokens
    python benchmarks/kernel_bench.py --check-only         # only compare outputs, full sizes
    python benchmarks/kernel_bench.py --interpret          # compare outputs on the CPU, tiny sizes

Needs torch and Triton only (no vLLM).  Per prompt length and model shape it
writes random K/V for `--batch` prompts into a paged cache laid out as vLLM's
GPU cache that the Triton adapter reads ([blocks, kv_heads, block_size,
2 * head_dim], pages shuffled), keeps a random `1 - sparsity` share of each
prompt's queries, and times with CUDA events (median of `--repeats`):

* `kernel`: `attention_at_positions` on the kept queries over the paged cache;
* `sdpa_kept`: SDPA on the same kept queries over contiguous K/V with a
  boolean mask (each query sees keys up to its own position);
* `sdpa_all`: SDPA with `is_causal=True` over every query of the prompt: what
  the block's attention costs when no token is skipped.

`kernel` must match `sdpa_kept` within the dtype's tolerance, or the run fails.
Shapes: SmolLM2-135M (9 heads, 3 KV heads, head size 64) and Llama-3-8B
(32, 8, 128).  `--sweep` also times a few tile sizes of the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without the package installed

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
SWEEP = [(32, 32, 4), (64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8)]  # block_m, block_n, warps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES, reverse=True))
    p.add_argument("--sparsity", type=float, default=0.3, help="share of each prompt's queries skipped")
    p.add_argument("--batch", type=int, default=1, help="prompts per step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache page")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--check-only", action="store_true", help="compare outputs, time nothing")
    p.add_argument("--interpret", action="store_true",
                   help="compare outputs on the CPU under Triton's interpreter, at tiny sizes")
    p.add_argument("--sweep", action="store_true", help="also time the kernel at other tile sizes")
    p.add_argument("--json", default="results/kernel_bench.json")
    args = p.parse_args(argv)

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles the kernel
        args.lengths, args.batch, args.check_only, args.dtype = [75], 2, True, "float32"
    if not args.interpret and not torch.cuda.is_available():
        print("kernel_bench: no CUDA device here; --interpret runs the correctness check on the CPU")
        return 2
    device = torch.device("cpu" if args.interpret else "cuda")
    dtype = getattr(torch, args.dtype)

    rows, failed = [], False
    for shape in args.shapes:
        heads, kv_heads, head_dim = SHAPES[shape]
        for length in args.lengths:
            case = build_case(args.batch, length, heads, kv_heads, head_dim, args.sparsity, args.block_size,
                              dtype, device, seed=length)
            row = {"shape": shape, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "length": length,
                   "batch": args.batch, "kept": case.kept_per_prompt, "dtype": args.dtype}
            row["max_abs_err"] = check(case)
            row["ok"] = row["max_abs_err"] <= TOLERANCE[args.dtype]
            failed |= not row["ok"]
            if not args.check_only:
                row.update(time_all(case, args.repeats, args.sweep))
            rows.append(row)
            print_row(row, first=len(rows) == 1)

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = "cpu (Triton interpreter)" if args.interpret else torch.cuda.get_device_name()
    out.write_text(json.dumps({"device": device_name, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"{'FAILED' if failed else 'ok'}: {len(rows)} cases on {device_name}; results in {out}")
    return 1 if failed else 0


def build_case(batch, length, heads, kv_heads, head_dim, sparsity, block_size, dtype, device, seed):
    """`batch` prompts of `length` tokens in a paged cache, and the same number of kept
    queries of each (a random subset, the last token always kept), in step order."""
    g = torch.Generator().manual_seed(seed)
    pages = -(-length // block_size)
    num_blocks = batch * pages + 7
    block_table = torch.randperm(num_blocks, generator=g)[: batch * pages].view(batch, pages).int()
    keys = torch.randn(batch, length, kv_heads, head_dim, generator=g)
    values = torch.randn(batch, length, kv_heads, head_dim, generator=g)
    # vLLM's allocation the adapter reads: [blocks, kv_heads, block_size, 2 * head_dim]
    cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_dim)
    pos = torch.arange(length)
    for r in range(batch):
        blocks = block_table[r, pos // block_size].long()
        cache[blocks, :, pos % block_size] = torch.cat([keys[r], values[r]], dim=-1)
    cache = cache.to(device, dtype)
    key_cache, value_cache = cache.transpose(1, 2).split(head_dim, dim=-1)

    kept_per_prompt = max(1, round(length * (1 - sparsity)))
    kept = torch.stack([torch.cat([torch.randperm(length - 1, generator=g)[: kept_per_prompt - 1],
                                   torch.tensor([length - 1])]).sort().values for _ in range(batch)])  # [B, n]
    q = torch.randn(batch, kept_per_prompt, heads, head_dim, generator=g)
    return SimpleNamespace(
        q=q.flatten(0, 1).to(device, dtype), positions=kept.flatten().to(device),
        requests=torch.arange(batch).repeat_interleave(kept_per_prompt).to(device),
        block_table=block_table.to(device), key_cache=key_cache, value_cache=value_cache,
        scale=head_dim ** -0.5, kept_per_prompt=kept_per_prompt, kept=kept.to(device),
        q_dense=q.transpose(1, 2).to(device, dtype),  # [B, H, n, D]
        k_dense=keys.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1).to(device, dtype),  # [B, H, L, D]
        v_dense=values.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1).to(device, dtype),
        q_all=torch.randn(batch, heads, length, head_dim, generator=g).to(device, dtype),
    )


def run_kernel(case, config=None):
    from ftp_vllm.kernels.attention import attention_at_positions, tiled_attention

    args = (case.q, case.positions, case.requests, case.block_table, case.key_cache, case.value_cache, case.scale)
    return attention_at_positions(*args) if config is None else tiled_attention(*args, config)


def run_sdpa_kept(case):
    visible = torch.arange(case.k_dense.shape[2], device=case.kept.device) <= case.kept[:, :, None]  # [B, n, L]
    return F.scaled_dot_product_attention(case.q_dense, case.k_dense, case.v_dense, attn_mask=visible[:, None],
                                          scale=case.scale)


def run_sdpa_all(case):
    return F.scaled_dot_product_attention(case.q_all, case.k_dense, case.v_dense, is_causal=True, scale=case.scale)


def check(case) -> float:
    """Largest absolute difference between the kernel and SDPA on the kept queries, with the
    launch's own tile sizes and with the keys split over 3 programs per tile."""
    from ftp_vllm.kernels.attention import LaunchConfig

    want = run_sdpa_kept(case).transpose(1, 2).flatten(0, 1).float()  # [B * n, H, D], step order
    return max((run_kernel(case, config).float() - want).abs().max().item()
               for config in (None, LaunchConfig(num_splits=3)))


def time_all(case, repeats, sweep) -> dict:
    from ftp_vllm.kernels.attention import LaunchConfig

    times = {"kernel_ms": median_ms(lambda: run_kernel(case), repeats),
             "sdpa_kept_ms": median_ms(lambda: run_sdpa_kept(case), repeats),
             "sdpa_all_ms": median_ms(lambda: run_sdpa_all(case), repeats)}
    if sweep:
        times["sweep_ms"] = {f"m{m}_n{n}_w{w}": median_ms(lambda: run_kernel(case, LaunchConfig(m, n, 1, w)), repeats)
                             for m, n, w in SWEEP}
    return times


def median_ms(fn, repeats) -> float:
    """Median of `repeats` CUDA-event timings, after warm-up calls (the first compiles)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def print_row(row, first):
    timed = "kernel_ms" in row
    if first:
        head = f"{'shape':8} {'length':>6} {'kept':>5} {'max err':>9}"
        print(head + (f" {'kernel ms':>9} {'sdpa kept':>9} {'sdpa all':>9} {'vs kept':>7} {'vs all':>6}" if timed else ""))
    line = f"{row['shape']:8} {row['length']:6d} {row['kept']:5d} {row['max_abs_err']:9.2e}"
    if timed:
        line += (f" {row['kernel_ms']:9.3f} {row['sdpa_kept_ms']:9.3f} {row['sdpa_all_ms']:9.3f}"
                 f" {row['sdpa_kept_ms'] / row['kernel_ms']:6.2f}x {row['sdpa_all_ms'] / row['kernel_ms']:5.2f}x")
        if "sweep_ms" in row:
            line += "  sweep: " + " ".join(f"{k}={v:.3f}" for k, v in row["sweep_ms"].items())
    print(line + ("" if row["ok"] else "  MISMATCH"))


if __name__ == "__main__":
    sys.exit(main())
