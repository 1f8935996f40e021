import math

import torch

from ftp_vllm.baselines import block_influence, change_oracle, random_keep, shortgpt_blocks, shortgpt_keep, static_keep
from ftp_vllm.reference import GivenMasks, PromptTopK, Served, rotate

from ftp_vllm.router import calibrate_threshold

from .conftest import calibrated_router, packed_batch


def test_all_kept_equals_transformers(tiny):
    ids, cu = packed_batch([13, 7, 20])
    out = tiny(ids, cu)
    with torch.no_grad():
        expected = torch.cat([tiny.hf(ids[None, a:b]).logits[0] for a, b in zip(cu[:-1], cu[1:])])
    assert (out.logits - expected).abs().max() < 1e-4
    assert out.keep.all() and out.routed == []


def manual_block(model, b, h, keep):
    """Block b by hand: per-token loop, softmax attention over every earlier token's K/V."""
    layer = model.layers[b]
    q, k, v = model.qkv(b, h)
    cos, sin = (t[0] for t in model.hf.model.rotary_emb(h[None], torch.arange(len(h))[None]))
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    group = model.num_heads // model.num_kv_heads
    out = h.clone()
    for i in range(len(h)):
        if not keep[i]:
            continue
        heads = []
        for hd in range(model.num_heads):
            logits = k[: i + 1, hd // group] @ q[i, hd] / math.sqrt(model.head_dim)
            heads.append(torch.softmax(logits, 0) @ v[: i + 1, hd // group])
        mid = h[i] + layer.self_attn.o_proj(torch.cat(heads))
        out[i] = mid + layer.mlp(layer.post_attention_layernorm(mid))
    return out


def test_skipped_token_passes_through_and_lends_its_kv(tiny):
    ids, cu = packed_batch([10], seed=1)
    keep = torch.ones(tiny.num_blocks, 10, dtype=torch.bool)
    keep[1, [3, 6]] = False
    out = tiny(ids, cu, keep=GivenMasks(keep), return_hidden=True)
    h_in, h_out = out.hidden[1], out.hidden[2]
    assert torch.equal(h_out[3], h_in[3]) and torch.equal(h_out[6], h_in[6])
    with torch.no_grad():
        expected = manual_block(tiny, 1, h_in, keep[1])
        torch.testing.assert_close(h_out, expected, atol=1e-5, rtol=1e-5)
        # The check is sensitive: without token 3's K/V, token 5 would come out different.
        without = manual_block(tiny, 1, torch.cat([h_in[:3], h_in[4:]]), torch.ones(9, dtype=torch.bool))
    assert (without[4] - h_out[5]).abs().max() > 1e-3


def test_features_and_decisions_look_backwards(tiny):
    router, ids, cu, _ = calibrated_router(tiny, [0.0, 0.4, 0.4, 0.0], lengths=(30,))
    base = tiny(ids, cu, keep=Served(router))
    changed = ids.clone()
    changed[20] = (changed[20] + 17) % 1000
    out = tiny(changed, cu, keep=Served(router))
    assert torch.equal(out.router_logits[:, :20], base.router_logits[:, :20])
    assert torch.equal(out.keep[:, :20], base.keep[:, :20])
    assert not torch.equal(out.router_logits[:, 20:], base.router_logits[:, 20:])


def test_prompt_then_decode_equals_token_by_token(tiny):
    """One pass over prompt + continuation == serving the prompt, then decoding one token at a time."""
    router, *_ = calibrated_router(tiny, [0.0, 0.5, 0.3, 0.0], prompt_lens=torch.tensor([30, 30]), decode_sparsity=[0.0, 0.5, 0.5, 0.0])
    ids, cu = packed_batch([40], seed=3)
    prompt = torch.tensor([30])
    # Put the decode thresholds of the routed blocks mid-way through this
    # continuation's logits (between two of them: float noise must not flip
    # a decision), so that the decode rule both keeps and skips.
    logits = tiny(ids, cu, prompt, keep=Served(router)).router_logits
    for b in (1, 2):
        router.threshold_decode[b] = calibrate_threshold(logits[b, 31:], 0.5)
    full = tiny(ids, cu, prompt, keep=Served(router))
    assert not full.keep[1:3, 31:].all() and full.keep[1:3, 31:].any()
    for n in range(30, 41):
        part = tiny(ids[:n], torch.tensor([0, n]), prompt, keep=Served(router))
        torch.testing.assert_close(part.logits[-1], full.logits[n - 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(part.keep, full.keep[:, :n])


def test_calibrated_thresholds_realise_targets(tiny):
    targets = [0.0, 0.25, 0.6, 0.4]
    router, ids, cu, calib = calibrated_router(tiny, targets, lengths=(50, 50))
    out = tiny(ids, cu, keep=Served(router))
    assert torch.equal(out.keep, calib.keep)
    realised = 1 - out.keep.float().mean(1)
    assert (realised - torch.tensor(targets)).abs().max() <= 0.01
    assert out.routed == [1, 2, 3] and out.keep[0].all()
    assert out.keep[:, [0, 49, 50, 99]].all()


def test_decode_threshold_has_its_own_target(tiny):
    router, ids, cu, calib = calibrated_router(
        tiny, [0.0, 0.5, 0.5, 0.0], lengths=(60, 60), prompt_lens=torch.tensor([40, 40]), decode_sparsity=[0.0, 0.1, 0.2, 0.0]
    )
    decode = torch.cat([torch.arange(40, 60), torch.arange(100, 120)])
    realised = 1 - calib.keep[:, decode].float().mean(1)
    assert (realised - torch.tensor([0.0, 0.1, 0.2, 0.0])).abs().max() <= 0.01


def test_prompt_topk_sparsity(tiny):
    router, ids, cu, _ = calibrated_router(tiny, [0.0, 0.3, 0.3, 0.0], lengths=(20, 20))
    out = tiny(ids, cu, keep=PromptTopK(router))
    assert out.keep[1:3, :20].sum(1).tolist() == [14, 14]


def test_baselines(tiny):
    ids, cu = packed_batch([12, 12], seed=4)
    prompt = torch.tensor([10, 10])
    static = static_keep(cu, [0.0, 0.5], prompt)
    assert static[0].all()
    assert static[1, :12].tolist() == [True] + [False] * 5 + [True] * 6
    rand = random_keep(cu, [0.0, 0.5], prompt, torch.Generator().manual_seed(0))
    assert rand[1, :10].sum() == 5 and rand[1, [0, 9, 10, 11]].all()

    influence = block_influence(tiny, ids, cu)
    assert influence.shape == (tiny.num_blocks,)
    drop = shortgpt_blocks(influence, 1)
    out = tiny(ids, cu, keep=GivenMasks(shortgpt_keep(tiny.num_blocks, 24, drop)), return_hidden=True)
    assert torch.equal(out.hidden[drop[0] + 1], out.hidden[drop[0]])


def test_change_oracle(tiny):
    """The analysis oracle keeps, per prompt, the tokens a block changes most (block 1 follows a
    dense block 0, so its full output is the dense pass's); with a large recency weight it is
    the static router."""
    ids, cu = packed_batch([12, 12], seed=4)
    prompt = torch.tensor([10, 10])
    schedule = [0.0, 0.5, 0.5, 0.0]
    out = tiny(ids, cu, prompt, keep=change_oracle(schedule))
    hidden = tiny(ids, cu, prompt, return_hidden=True).hidden
    change = 1 - torch.nn.functional.cosine_similarity(hidden[1], hidden[2], dim=-1)
    for start in (0, 12):
        routable = change[start + 1:start + 9]  # the first and last prompt tokens are always kept
        expected = torch.zeros(12, dtype=torch.bool)
        expected[[0, 9, 10, 11]] = True
        expected[1 + routable.topk(3).indices] = True  # 5 of 10 kept
        assert out.keep[1, start:start + 12].tolist() == expected.tolist()
    assert out.keep[[0, 3]].all()
    static = static_keep(cu, schedule, prompt)
    recent = tiny(ids, cu, prompt, keep=change_oracle(schedule, recency=1e3))
    assert torch.equal(recent.keep, static)
    assert torch.allclose(recent.logits, tiny(ids, cu, prompt, keep=GivenMasks(static)).logits)


def test_short_prompt_thresholds_hit_the_target_at_each_length(tiny):
    from ftp_vllm.evaluation import SkipCounter
    from ftp_vllm.reference import calibrate_router_inputs, calibrate_router_thresholds, calibrate_short_thresholds

    schedule = [0.0, 0.5, 0.3, 0.0]
    router = tiny.new_router(min_prompt=0, short_lengths=[8, 16], threshold_length=32)
    router.set_schedule(schedule, [0.0] * 4)
    ids, _ = packed_batch([32] * 6)
    prompts = ids.view(6, 32)
    cu = torch.arange(7) * 32
    calibrate_router_inputs(tiny, router, ids, cu)
    calibrate_router_thresholds(tiny, router, ids, cu, torch.full((6,), 32))
    long_thresholds = router.threshold_prompt.clone()
    assert calibrate_short_thresholds(tiny, router, prompts) == {8: 24, 16: 12}
    assert torch.equal(router.threshold_prompt, long_thresholds)
    for L in (8, 16):
        cut = prompts.reshape(-1, L)
        keep = tiny(cut.reshape(-1), torch.arange(len(cut) + 1) * L, torch.full((len(cut),), L), keep=Served(router)).keep
        skipped = SkipCounter.of(keep, torch.ones(keep.shape[1], dtype=torch.bool)).per_block["prompt"]
        for b, s in enumerate(schedule):  # calibrate_threshold skips round(s n) of the n tokens it saw
            assert skipped[b] == round(s * keep.shape[1]), (L, b)
