"""Serving reliability on the real model: batch invariance and preemption (offline engine,
same engine as `vllm serve`; the server-side faults are in test_serve.py)."""


import pytest

from .conftest import decode_routed_router, real_prompts, run_engines

pytestmark = pytest.mark.engine

NEW_TOKENS = 16


def mixed_prompts(n: int) -> list[str]:
    """Real text, lengths from a few words to a few hundred."""
    return [" ".join(p.split()[: 8 + (37 * i) % 180]) for i, p in enumerate(real_prompts(n, words=190))]


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


def test_float32_batch_invariance_and_preemption(real_model, tmp_path):
    router = decode_routed_router(tmp_path / "router")
    prompts = mixed_prompts(32)
    ftp = {"model": real_model, "dtype": "float32", "enable_prefix_caching": False,
           "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": router}}
    small_cache = {"kv_cache_memory_bytes": 48 << 20, "max_model_len": 640}  # ~1,000 fp32 tokens
    trace = str(tmp_path / "preempted.jsonl")
    common = {"prompts": prompts, "max_tokens": NEW_TOKENS}
    runs = [
        {"llm": ftp, "one_by_one": True, "also_together": True, **common},
        {"llm": {**ftp, **small_cache}, "env": {"FTP_VLLM_TRACE": trace}, **common},
    ]
    f32_run, preempted = run_engines(runs)
    alone = f32_run["tokens"]
    assert len({tuple(t) for t in alone}) > 24, "degenerate outputs prove nothing"

    # each request's output is the same alone and among 32 of mixed lengths
    assert f32_run["tokens_together"] == alone

    # requests were preempted and recomputed (skipped tokens' K/V included), and every
    # output equals its unpreempted one
    assert recomputed_requests(preempted["traces"][0]) > 0, "the small cache should force preemption"
    assert preempted["tokens"] == alone


@pytest.mark.slow
def test_bfloat16_batch_sensitivity_no_worse_than_stock(real_model):
    """In bfloat16 neither stock vLLM nor FTP is batch-invariant on a CPU; FTP (the shipped
    30% router) must differ between alone and among 32 no more often than stock.  Slow on a
    CPU without native bfloat16: `make test ARGS="-m slow"`."""
    prompts = mixed_prompts(32)
    bf16 = {"model": real_model, "dtype": "bfloat16", "enable_prefix_caching": False}
    ftp = {**bf16, "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": "smollm2-135m-instruct-s30"}}
    common = {"prompts": prompts, "max_tokens": NEW_TOKENS, "one_by_one": True, "also_together": True}
    stock_run, ftp_run = run_engines([{"llm": bf16, **common}, {"llm": ftp, **common}])
    stock_diff = differing(stock_run["tokens"], stock_run["tokens_together"])
    ftp_diff = differing(ftp_run["tokens"], ftp_run["tokens_together"])
    print(f"bfloat16, alone vs among 32: stock differs on {stock_diff}, FTP on {ftp_diff} of {len(prompts)} prompts")
    assert ftp_diff <= stock_diff
