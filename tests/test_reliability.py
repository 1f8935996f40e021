"""Serving reliability on the real model: batch invariance and preemption (offline engine,
same engine as `vllm serve`; the server-side faults are in test_serve.py)."""


import pytest

from .conftest import real_prompts, run_engines

pytestmark = pytest.mark.engine

NEW_TOKENS = 24


def decode_routed_router(out) -> str:
    """The shipped 30% router with decode tokens routed too (its prompt schedule and
    thresholds), so that preemption has decode-token decisions to recompute."""
    from ftp_vllm.checkpoint import load_checkpoint, save_checkpoint

    router, config = load_checkpoint("smollm2-135m-instruct-s30")
    router.set_schedule(router.sparsity.tolist(), router.sparsity.tolist())
    router.threshold_decode.copy_(router.threshold_prompt)
    config = {k: v for k, v in config.items() if k not in ("schema_version", "router", "schedule")}
    return str(save_checkpoint(out, router, config))


def mixed_prompts(n: int) -> list[str]:
    """Real text, lengths from a few words to a few hundred."""
    return [" ".join(p.split()[: 8 + (37 * i) % 260]) for i, p in enumerate(real_prompts(n, words=270))]


def recomputed_requests(trace: list[dict]) -> int:
    """Steps where a request ran more than one token past its prompt at once: a preempted
    request recomputing its KV (prompt and generated tokens) on resumption."""
    count = 0
    for step in trace:
        cu = step["cu_seqlens"]
        for a, b in zip(cu[:-1], cu[1:]):
            past_prompt = [p for p, pl in zip(step["positions"][a:b], step["prompt_lens"][a:b]) if p >= pl]
            count += len(past_prompt) > 1
    return count


def differing(a: list, b: list) -> int:
    return sum(x != y for x, y in zip(a, b))


def test_batch_invariance_and_preemption(real_model, tmp_path):
    router = decode_routed_router(tmp_path / "router")
    prompts = mixed_prompts(32)
    ftp = {"model": real_model, "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": router}}
    stock = {"model": real_model}
    f32 = {"dtype": "float32"}
    bf16 = {"dtype": "bfloat16"}
    small_cache = {"kv_cache_memory_bytes": 48 << 20, "max_model_len": 1024}  # ~1,000 fp32 tokens
    trace = str(tmp_path / "preempted.jsonl")
    common = {"prompts": prompts, "max_tokens": NEW_TOKENS}
    runs = [
        {"llm": {**ftp, **f32}, "one_by_one": True, **common},
        {"llm": {**ftp, **f32}, **common},
        {"llm": {**ftp, **f32, **small_cache}, "env": {"FTP_VLLM_TRACE": trace}, **common},
        {"llm": {**stock, **bf16}, "one_by_one": True, **common},
        {"llm": {**stock, **bf16}, **common},
        {"llm": {**ftp, **bf16}, "one_by_one": True, **common},
        {"llm": {**ftp, **bf16}, **common},
    ]
    alone, together, preempted, stock_alone, stock_together, bf_alone, bf_together = run_engines(runs)
    assert len({tuple(t) for t in alone["tokens"]}) > 24, "degenerate outputs prove nothing"

    # float32: each request's output is the same alone and among 32 of mixed lengths
    assert together["tokens"] == alone["tokens"]

    # preemption: requests were preempted and recomputed (skipped tokens' K/V included),
    # and every output equals its unpreempted one
    assert recomputed_requests(preempted["traces"][0]) > 0, "the small cache should force preemption"
    assert preempted["tokens"] == alone["tokens"]

    # bfloat16: FTP differs between alone and batched no more often than stock vLLM
    stock_diff = differing(stock_alone["tokens"], stock_together["tokens"])
    ftp_diff = differing(bf_alone["tokens"], bf_together["tokens"])
    print(f"bfloat16, alone vs among 32: stock differs on {stock_diff}, FTP on {ftp_diff} of {len(prompts)} prompts")
    assert ftp_diff <= stock_diff
