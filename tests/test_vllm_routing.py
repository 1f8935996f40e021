"""Routing inside vLLM equals the plain-PyTorch reference (float32): keep masks and greedy tokens,
with chunked prefill, prefix-cache hits and mixed batches."""

import json

import pytest
import torch

from .conftest import decode_routed_router, real_prompts, run_engines, save_changed_router

pytestmark = pytest.mark.engine

SCHEDULE = [0.0, 0.5, 0.3, 0.0]
DECODE_SCHEDULE = [0.0, 0.5, 0.5, 0.0]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_router(tiny_llama, tmp_path_factory):
    """A router for the tiny Llama: untrained MLP, calibrated on real text; it routes prompts of
    any length, with thresholds of its own for prompts of 32-47 tokens (the 40-token prompt
    below uses them)."""
    from transformers import AutoTokenizer

    from ftp_vllm.checkpoint import fingerprint, save_checkpoint
    from ftp_vllm.reference import (
        RoutedModel, calibrate_router_inputs, calibrate_router_thresholds, calibrate_short_thresholds,
    )

    torch.manual_seed(0)
    model = RoutedModel.from_pretrained(tiny_llama)
    router = model.new_router(min_prompt=0, short_lengths=[32], threshold_length=48)
    router.set_schedule(SCHEDULE, DECODE_SCHEDULE)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    chunks = [tok(t)["input_ids"][:64] for t in real_prompts(8, words=80)]
    ids = torch.tensor(sum(chunks, []))
    cu = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0)
    prompt_lens = torch.tensor([48] * len(chunks))
    calibrate_router_inputs(model, router, ids, cu)
    calibrate_router_thresholds(model, router, ids, cu, prompt_lens)
    calibrate_short_thresholds(model, router, torch.stack([torch.tensor(c[:48]) for c in chunks]))
    assert not torch.equal(router.threshold_short[1:3, 0], router.threshold_prompt[1:3])
    folder = save_checkpoint(tmp_path_factory.mktemp("router"), router, {"base_model": fingerprint(tiny_llama)})
    return model, router, str(folder), tok


def reference_masks(model, router, prompt: list[int], generated: list[int]):
    """Keep masks [B, T] and greedy continuation of the reference over what vLLM processed."""
    from ftp_vllm.reference import Served

    ids = torch.tensor(prompt + generated[:-1])
    out = model(ids, torch.tensor([0, len(ids)]), torch.tensor([len(prompt)]), keep=Served(router))
    greedy = out.logits[len(prompt) - 1:].argmax(-1).tolist()
    return out.keep, greedy


def vllm_masks(trace: list[dict], num_blocks: int, length: int, prompt_len: int | None = None) -> torch.Tensor:
    """Per-block keep masks by position (-1: not computed) from one request's trace lines, or
    from a batch's, of the request whose prompt has `prompt_len` tokens (prompt lengths differ)."""
    keep = torch.full((num_blocks, length), -1)
    for step in trace:
        rows = [i for i, n in enumerate(step["prompt_lens"]) if prompt_len in (None, n)]
        for block, mask in step["keep"].items():
            keep[int(block), [step["positions"][i] for i in rows]] = torch.tensor([mask[i] for i in rows], dtype=torch.long)
    return keep


def test_vllm_keep_masks_and_tokens_equal_reference(tiny_llama, tiny_router, tmp_path):
    model, router, folder, tok = tiny_router
    prompts = [tok(t)["input_ids"][:n] for t, n in zip(real_prompts(4, words=300), (40, 150, 200, 260))]
    llm = {"model": tiny_llama, "dtype": "float32", "max_model_len": 512,
           "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": folder}}
    inputs = [{"prompt_token_ids": p} for p in prompts]
    runs = [
        # whole prompts, one request at a time
        {"llm": llm, "prompts": inputs, "max_tokens": NEW_TOKENS, "one_by_one": True,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / "whole.jsonl"), "FTP_VLLM_STATS": str(tmp_path / "stats.json"),
                 "FTP_VLLM_STATS_INTERVAL": "0"}},
        # chunked prefill in 32-token steps; each prompt twice, so the second is a prefix-cache hit
        {"llm": {**llm, "max_num_batched_tokens": 32, "max_num_seqs": 4}, "prompts": inputs + inputs,
         "max_tokens": NEW_TOKENS, "one_by_one": True,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / "chunked.jsonl")}},
        # all prompts in one batch: prefill and decode mixed in steps
        {"llm": {**llm, "max_num_batched_tokens": 64}, "prompts": inputs, "max_tokens": NEW_TOKENS},
        # scores from keys, as for quantized weights (no folded key projection)
        {"llm": llm, "prompts": inputs, "max_tokens": NEW_TOKENS, "one_by_one": True,
         "env": {"FTP_VLLM_SCORE": "keys", "FTP_VLLM_TRACE": str(tmp_path / "keys.jsonl")}},
    ]
    whole, chunked, batched, keys = run_engines(runs)
    assert whole["architecture"] == "FTPLlamaForCausalLM"
    # decode tokens are routed: decode steps score their tokens, which later decisions rank against
    assert any(num_prompt == 0 for num_prompt, _ in whole["score_writes"])
    for i, prompt in enumerate(prompts):
        generated = whole["tokens"][i]
        ref_keep, ref_greedy = reference_masks(model, router, prompt, generated)
        length = len(prompt) + NEW_TOKENS - 1
        got = vllm_masks(whole["traces"][i], router.num_blocks, length)
        routed = [b for b in range(router.num_blocks) if not router.is_dense(b)]
        assert torch.equal(got[routed], ref_keep[routed].long()), f"prompt {i}: keep masks differ"
        assert not ref_keep[routed].all() and ref_keep[routed].any(), "the router should keep some and skip some"
        assert generated == ref_greedy, f"prompt {i}: greedy tokens differ from the reference"
        if len(prompt) < router.threshold_length:  # routed by its short-prompt thresholds, which decide otherwise
            short = router.threshold_short.clone()
            router.threshold_short.copy_(router.threshold_prompt[:, None])
            assert not torch.equal(reference_masks(model, router, prompt, generated)[0][routed], ref_keep[routed])
            router.threshold_short.copy_(short)
        # the same with chunked prefill
        assert chunked["tokens"][i] == generated
        got = vllm_masks(chunked["traces"][i], router.num_blocks, length)
        assert torch.equal(got[routed], ref_keep[routed].long()), f"prompt {i}: chunked keep masks differ"
        assert max(len(s["positions"]) for s in chunked["traces"][i]) <= 32
        # and again on a prefix-cache hit: the cached tokens are not recomputed
        again = chunked["traces"][len(prompts) + i]
        assert chunked["tokens"][len(prompts) + i] == generated
        got = vllm_masks(again, router.num_blocks, length)
        computed = got[routed[0]] >= 0
        if len(prompt) > 128:
            assert not computed[: 128].any(), "expected a prefix-cache hit"
        assert torch.equal(got[routed][:, computed], ref_keep[routed][:, computed].long())
        assert batched["tokens"][i] == generated, f"prompt {i}: batch neighbours changed the output"
        assert keys["tokens"][i] == generated
        got = vllm_masks(keys["traces"][i], router.num_blocks, length)
        assert torch.equal(got[routed], ref_keep[routed].long()), f"prompt {i}: keep masks from keys differ"

    # the realised-sparsity counters agree with the keep masks
    stats = json.loads((tmp_path / "stats.json").read_text())
    steps = [s for trace in whole["traces"] for s in trace]
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts)
    assert stats["decode_tokens"] == len(prompts) * (NEW_TOKENS - 1)
    for row in stats["per_block"]:
        b = str(row["block"])
        kept = [(k, pos < pl) for s in steps if b in s["keep"] for k, pos, pl in zip(s["keep"][b], s["positions"], s["prompt_lens"])]
        assert row["prompt_kept"] == sum(k for k, is_prompt in kept if is_prompt)
        assert row["decode_kept"] == sum(k for k, is_prompt in kept if not is_prompt)
    skipped = sum(r["prompt_total"] - r["prompt_kept"] for r in stats["per_block"])
    assert stats["prompt_sparsity"] == pytest.approx(skipped / (4 * stats["prompt_tokens"]))


def test_tensor_parallel_equals_single_rank(tiny_llama, tiny_router, tmp_path):
    """TP=2 (one CPU core per rank) makes the same decisions and tokens as TP=1."""
    _, _, folder, tok = tiny_router
    prompts = [{"prompt_token_ids": tok(t)["input_ids"][:100]} for t in real_prompts(4, words=150)]
    llm = {"model": tiny_llama, "dtype": "float32", "max_model_len": 512,
           "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": folder}}
    runs = [
        {"llm": llm, "prompts": prompts, "max_tokens": NEW_TOKENS, "one_by_one": True,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / "tp1.jsonl")}},
        {"llm": {**llm, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
         "prompts": prompts, "max_tokens": NEW_TOKENS, "one_by_one": True,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / "tp2.jsonl"), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}},
    ]
    tp1, tp2 = run_engines(runs)
    assert tp1["tokens"] == tp2["tokens"]
    for a, b in zip(tp1["traces"], tp2["traces"]):
        assert a and {s["rank"] for s in b} == {0, 1}
        for rank in (0, 1):
            assert [s["keep"] for s in b if s["rank"] == rank] == [s["keep"] for s in a]


def test_fast_path_equals_simple_path_real_model(real_model, tmp_path):
    """The fast path (query, attention, output projection and MLP for kept tokens only) makes
    the simple path's decisions and greedy tokens: real model, the shipped 30% router with
    decode tokens routed too, float32, 8 prompts in one batch, prefill chunked at 256 tokens
    and mixed with decode steps."""
    from transformers import AutoTokenizer

    router = decode_routed_router(tmp_path / "router")
    tok = AutoTokenizer.from_pretrained(real_model)
    lengths = (70, 120, 180, 250, 300, 90, 200, 330)
    prompts = [{"prompt_token_ids": tok(t)["input_ids"][:n]} for t, n in zip(real_prompts(8, words=400), lengths)]
    llm = {"model": real_model, "dtype": "float32", "max_model_len": 1024, "max_num_batched_tokens": 256,
           "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": router}}
    simple, fast = run_engines([
        {"llm": llm, "prompts": prompts, "max_tokens": NEW_TOKENS,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / f"{path}.jsonl"), "FTP_VLLM_PATH": path}}
        for path in ("simple", "fast")
    ])
    assert fast["tokens"] == simple["tokens"]
    steps_simple, steps_fast = simple["traces"][0], fast["traces"][0]
    assert len(steps_fast) == len(steps_simple) > len(lengths)
    for a, b in zip(steps_simple, steps_fast):
        assert (a["positions"], a["keep"]) == (b["positions"], b["keep"])
    kept = [k for s in steps_fast for mask in s["keep"].values() for k in mask]
    assert 0 < sum(kept) < len(kept)


def test_compiled_mode_equals_eager(tiny_llama, tiny_router, tmp_path):
    """vLLM's default compiled mode: same decisions and greedy tokens as eager (float32).
    Decode tokens are kept (as by the shipped routers) and prompts routed (by the tiny
    router's decode thresholds, and its short-prompt ones for the 40-token prompt), so
    decode steps run the stock graph (the stock model: no scores) and prompt steps
    vLLM's graph with the routed blocks as an opaque op, which runs its MLP in chunks of
    16 tokens here (as it does for a real model's large steps on CPUs).  Steps that mix
    prompt chunks with decode tokens decide on the prompts' requests alone; both modes
    equal the reference there too."""
    from ftp_vllm.checkpoint import load_checkpoint

    model, _, folder, tok = tiny_router
    router, config = load_checkpoint(folder)
    router.set_schedule(SCHEDULE, [0.0] * len(SCHEDULE))
    router.threshold_prompt.copy_(router.threshold_decode)
    folder = save_changed_router(router, config, tmp_path / "prompt-routed")
    prompts = [{"prompt_token_ids": tok(t)["input_ids"][:n]} for t, n in zip(real_prompts(4, words=300), (40, 150, 200, 260))]
    llm = {"model": tiny_llama, "dtype": "float32", "max_model_len": 512, "max_num_batched_tokens": 128,
           "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": folder}}
    eager, compiled = run_engines([
        {"llm": {**llm, "enforce_eager": mode == "eager"}, "prompts": prompts, "max_tokens": NEW_TOKENS,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / f"{mode}.jsonl"), "FTP_VLLM_MLP_CHUNK": "16"}}
        for mode in ("eager", "compiled")
    ])
    assert compiled["tokens"] == eager["tokens"]
    # decode tokens are kept: a decode step scores nothing (nothing would read it), as stock vLLM
    for run in (eager, compiled):
        assert run["score_writes"] and all(num_prompt > 0 for num_prompt, _ in run["score_writes"])
    routed = [b for b, target in enumerate(SCHEDULE) if target > 0]
    for i, prompt in enumerate(prompts):
        ids = prompt["prompt_token_ids"]
        ref_keep, ref_greedy = reference_masks(model, router, ids, eager["tokens"][i])
        assert eager["tokens"][i] == ref_greedy
        got = vllm_masks(eager["traces"][0], router.num_blocks, len(ids) + NEW_TOKENS - 1, len(ids))
        assert torch.equal(got[routed], ref_keep[routed].long()), f"prompt {i}: keep masks differ"
    mixed = [s for s in eager["traces"][0] if len(set(p < n for p, n in zip(s["positions"], s["prompt_lens"]))) == 2]
    assert mixed, "some steps should mix prompt chunks and decode tokens"
    assert [(s["positions"], s["keep"]) for s in compiled["traces"][0]] == \
        [(s["positions"], s["keep"]) for s in eager["traces"][0]]
    kept = [k for s in compiled["traces"][0] for mask in s["keep"].values() for k in mask]
    assert 0 < sum(kept) < len(kept)
    decode_steps = [s for s in compiled["traces"][0] if all(p >= n for p, n in zip(s["positions"], s["prompt_lens"]))]
    routed_blocks = {str(b) for b, target in enumerate(SCHEDULE) if target > 0}
    assert decode_steps and all(set(s["keep"]) == routed_blocks for s in decode_steps), "every routed block records"
    assert all(all(m) for s in decode_steps for m in s["keep"].values())
    assert all(s["stock_graph"] for s in decode_steps)
    assert not any(s["stock_graph"] for s in compiled["traces"][0] if s not in decode_steps)
    assert not any(s["stock_graph"] for s in eager["traces"][0])


def test_each_request_is_served_at_its_level_in_a_mixed_batch(tiny_llama, tiny_router, tmp_path):
    """The sparsity dial in vLLM's engine (float32, greedy): requests at three levels of one
    ladder, in one batch, each equal the request served alone at its level; level 0 equals
    stock vLLM and skips nothing; the lower routed level skips less than the higher."""
    from ftp_vllm.checkpoint import fingerprint, load_checkpoint, save_ladder

    from ftp_vllm.reference import calibrate_router_thresholds, calibrate_short_thresholds

    model, _, folder, tok = tiny_router
    top, _ = load_checkpoint(folder)
    low, _ = load_checkpoint(folder)  # the same router at half its targets, calibrated again
    low.set_schedule([s / 2 for s in SCHEDULE], [s / 2 for s in DECODE_SCHEDULE])
    chunks = [tok(t)["input_ids"][:64] for t in real_prompts(8, words=80)]
    cu = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0)
    calibrate_router_thresholds(model, low, torch.tensor(sum(chunks, [])), cu, torch.tensor([48] * len(chunks)))
    calibrate_short_thresholds(model, low, torch.stack([torch.tensor(c[:48]) for c in chunks]))
    level = round(sum(SCHEDULE) / len(SCHEDULE), 4)
    rungs = [(r, {"base_model": fingerprint(tiny_llama), "target_sparsity": x}) for r, x in ((low, level / 2), (top, level))]
    dial = str(save_ladder(tmp_path / "dial", rungs, default=level))
    prompts = [{"prompt_token_ids": tok(t)["input_ids"][:n]} for t, n in zip(real_prompts(3, words=150), (60, 90, 120))]
    levels = [0.0, level / 2, None]  # None: the default, the top
    llm = {"model": tiny_llama, "dtype": "float32", "max_model_len": 512}
    routed, stock = run_engines([
        {"llm": {**llm, "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": dial}},
         "prompts": prompts, "max_tokens": NEW_TOKENS, "levels": levels, "one_by_one": True, "also_together": True,
         "env": {"FTP_VLLM_TRACE": str(tmp_path / "trace.jsonl")}},
        {"llm": llm, "prompts": prompts[:1], "max_tokens": NEW_TOKENS},
    ])
    assert routed["tokens_together"] == routed["tokens"]
    assert routed["tokens"][0] == stock["tokens"][0]
    skipped = [sum(len(m) - sum(m) for s in trace for m in s["keep"].values()) for trace in routed["traces"]]
    prompt_tokens = [len(p["prompt_token_ids"]) for p in prompts]
    assert skipped[0] == 0 and 0 < skipped[1] / prompt_tokens[1] < skipped[2] / prompt_tokens[2], skipped
