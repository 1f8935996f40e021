"""Where a routed block's time goes: one in-process engine with timers around the routed op's parts.

    python benchmarks/profile_routed.py --router smollm2-135m-instruct-s30 --workload prompt-heavy

Runs one of `throughput.py`'s workloads on one engine (the same settings) and
prints, per repetition, the wall time and the total seconds and calls of each
timed part: the routed op (`routed_block`), the router's decision
(`decide`, within it `block_logits` and `keep`), the block for the kept
tokens (`_kept_block`), within it attention for the kept queries
(`cpu_attention`, within it `query_runs`) and the post-attention norm and
MLP (`_kept_mlp`), the keep-everything block (`_stock_block_from`), the
cache write of the K/V path (`kv_update`) and vLLM's own attention
(`stock_attention`: every attention call of the stock layers).  Per-call
means divide by the calls.  The timers cost a few microseconds a call, so a
profiled run is slower than a benchmark run; compare parts within a run, and
runs with each other, not with `throughput.py`'s walls.  Parts compiled on
their own in compiled mode (projections, rotary) are not timed separately: a
timer inside them would be traced by the compiler.

    python benchmarks/profile_routed.py --linear-rows 32 22 1

times instead what a block's linear layers cost for that many tokens (the
model's own weights, every block, no engine): what a routed block can save by
running fewer rows.

    python benchmarks/profile_routed.py --router smollm2-135m-instruct-s30 --serving-steps 300 --repeats 3

times single engine steps as a server at a steady rate sees them, stock
against the router, each in an engine process of its own, interleaved as
`throughput.py` runs its methods: 16 requests decoding, then, 8 times, four
decode-only steps and one step that adds a new prompt of that many tokens
(median ms of each kind, per repetition).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

TIMED_PARTS = {
    "ftp_vllm.models.routing.RoutingState": ("decide", "keep_all", "begin_step", "end_step"),
    "ftp_vllm.models.routed.RoutedDecoderLayer": ("routed_block", "_kept_block", "_stock_block_from", "_kept_mlp"),
    "ftp_vllm.router.Router": ("block_logits", "keep"),
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl": ("forward",),
}
RENAMED = {"forward": "stock_attention"}


def install_timers(totals: dict, calls: collections.Counter) -> None:
    import importlib

    from ftp_vllm.kernels import attention as kept_attention
    from ftp_vllm.kernels import backends
    from ftp_vllm.models import routed

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                calls[name] += 1
        return wrapper

    for path, names in TIMED_PARTS.items():
        module, cls = path.rsplit(".", 1)
        owner = getattr(importlib.import_module(module), cls)
        for name in names:
            setattr(owner, name, timed(RENAMED.get(name, name), getattr(owner, name)))
    backends.cpu_attention = timed("cpu_attention", backends.cpu_attention)
    routed.unified_kv_cache_update = timed("kv_update", routed.unified_kv_cache_update)
    kept_attention.query_runs = timed("query_runs", kept_attention.query_runs)


def linear_times(model: str, rows: list[int], repeats: int = 20) -> dict[int, float]:
    """Median ms for the query, K/V, output and MLP projections of every block on `rows` tokens."""
    import statistics

    import torch

    from ftp_vllm.model_store import resolve_model
    from ftp_vllm.reference import RoutedModel

    layers = RoutedModel.from_pretrained(resolve_model(model)).hf.model.layers
    weights = [[m.weight.detach() for m in (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj,
                                             l.self_attn.o_proj, l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj)]
               for l in layers]

    def run(x):
        with torch.no_grad():
            for q, k, v, o, gate, up, down in weights:
                _keys, _values = x @ k.T, x @ v.T
                h = (x @ q.T) @ o.T
                _out = (torch.nn.functional.silu(h @ gate.T) * (h @ up.T)) @ down.T

    result = {}
    for n in rows:
        x = torch.randn(n, weights[0][0].shape[1])
        run(x)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            samples.append(1e3 * (time.perf_counter() - start))
        result[n] = statistics.median(samples)
    return result


def router_checkpoint(name: str, keep_all: bool, model_folder, out: Path):
    """Router `name`'s checkpoint folder or, with `keep_all`, the same router keeping every token, saved at `out`."""
    import throughput

    from ftp_vllm.checkpoint import resolve_router

    return throughput.keep_all_router(name, model_folder, out) if keep_all else resolve_router(name)


def compare_serving_steps(args) -> int:
    """`--serving-steps`: stock and the router (as `--keep-all` says), interleaved repetitions."""
    import statistics
    import tempfile
    from contextlib import ExitStack

    import throughput

    from ftp_vllm.engine_process import EngineProcess
    from ftp_vllm.model_store import resolve_model

    folder = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="ftp-steps-"))
    base = {**throughput.engine_args(folder, args.dtype), "enforce_eager": args.mode == "eager"}
    methods = {"stock": base}  # engine name: `LLM` arguments
    for i, name in enumerate(([args.router] if args.router else []) + args.also):
        if name == "stock":  # another stock engine: how far two engines of one method differ
            methods[f"stock ({i + 2})"] = base
            continue
        router = router_checkpoint(name, args.keep_all, folder, work / f"keep-all-{i}")
        methods[f"ftp {name}" + (" keep-all" if args.keep_all else "")] = {**base, **throughput.routed_overrides(router)}
    results = {name: [] for name in methods}
    with ExitStack() as stack:
        engines = {}
        for i, (name, llm) in enumerate(methods.items()):
            engines[name] = stack.enter_context(EngineProcess(work / f"{i}.log"))
            engines[name].start(llm)
        for rep in range(args.repeats):
            for name in list(engines) if rep % 2 == 0 else list(engines)[::-1]:
                steps = engines[name].run(throughput.serving_steps, tokenizer=base["tokenizer"],
                                          prompt_tokens=args.serving_steps)
                results[name].append(steps)
                print(f"repetition {rep + 1}, {name}: decode-only step {steps['decode_ms']:.1f} ms, "
                      f"step with a {args.serving_steps}-token prompt {steps['with_prompt_ms']:.1f} ms", flush=True)
    for name, runs in results.items():
        print(f"{name}: medians over repetitions: decode-only {statistics.median(r['decode_ms'] for r in runs):.1f} ms, "
              f"with prompt {statistics.median(r['with_prompt_ms'] for r in runs):.1f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--router", help="router name or checkpoint folder (none: the stock model)")
    p.add_argument("--keep-all", action="store_true", help="the router with thresholds that keep every token")
    p.add_argument("--workload", default="prompt-heavy", choices=["prompt-heavy", "decode-heavy", "mixed"])
    p.add_argument("--mode", default="compiled", choices=["compiled", "eager"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default: as throughput.py (bfloat16 where native, else float32)")
    p.add_argument("--linear-rows", nargs="+", type=int,
                   help="no engine: time every block's linear layers on this many tokens")
    p.add_argument("--serving-steps", type=int, metavar="PROMPT_TOKENS",
                   help="time decode-only steps and steps that add a prompt of this many tokens")
    p.add_argument("--also", nargs="*", default=[], metavar="ROUTER",
                   help="with --serving-steps: more routers, each in an engine of its own ('stock': one more "
                        "stock engine)")
    p.add_argument("--json", help="write the per-repetition figures here")
    args = p.parse_args(argv)
    if args.linear_rows:
        times = linear_times(args.model, args.linear_rows)
        for n, ms in times.items():
            print(f"{n:5d} tokens: {ms:8.1f} ms for the linear layers of every block (median of 20)")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "linear_ms": times}, indent=1))
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    if args.serving_steps:
        return compare_serving_steps(args)
    import tempfile

    import throughput
    from transformers import AutoTokenizer
    from vllm import LLM

    from ftp_vllm.engine_process import engine_env
    from ftp_vllm.model_store import resolve_model

    engine_env(os.environ)  # the model in this process, under the timers
    totals, calls = collections.defaultdict(float), collections.Counter()
    install_timers(totals, calls)
    folder = resolve_model(args.model)
    llm_args = {**throughput.engine_args(folder, args.dtype), "enforce_eager": args.mode == "eager"}
    if args.router:
        router = router_checkpoint(args.router, args.keep_all, folder,
                                   Path(tempfile.mkdtemp(prefix="ftp-profile-")) / "keep-all")
        llm_args.update(throughput.routed_overrides(router))
    llm = LLM(**llm_args)
    prompts, params = throughput.workload_inputs(args.workload, AutoTokenizer.from_pretrained(folder))
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    runs = []
    for rep in range(args.repeats):
        totals.clear()
        calls.clear()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        run = {"wall_s": round(time.perf_counter() - start, 3),
               "parts": {k: {"s": round(totals[k], 3), "calls": calls[k], "ms_per_call": round(1e3 * totals[k] / calls[k], 3)}
                         for k in sorted(totals)}}
        runs.append(run)
        print(f"repetition {rep + 1}: wall {run['wall_s']:.1f} s")
        for name, part in run["parts"].items():
            print(f"  {name:<16} {part['s']:8.3f} s  {part['calls']:6d} calls  {part['ms_per_call']:8.3f} ms/call")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
