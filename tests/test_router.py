import math

import pytest
import torch

from ftp_vllm import router as R
from ftp_vllm.reference import rotate


def brute_rank(scores, cu):
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = scores[a:b]
        out += [float((s[: i + 1] <= s[i]).sum()) / (i + 1) for i in range(b - a)]
    return torch.tensor(out)


def ties_and_noise(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(0, 3, (n,), generator=g).float(), torch.randn(n, generator=g))


@pytest.fixture(params=["per-request", "padded-table"])
def rank_path(request, monkeypatch):
    """Both ways `RankLayout` computes ranks (few requests / many requests)."""
    monkeypatch.setattr(R.RankLayout, "LOOP_MAX_REQUESTS", 16 if request.param == "per-request" else 0)
    return request.param


def test_causal_rank_matches_definition(rank_path):
    cu = torch.tensor([0, 7, 8, 30])
    scores = ties_and_noise(30, 0)
    assert torch.equal(R.causal_rank(scores, cu), brute_rank(scores, cu))
    assert R.causal_rank(scores, cu)[0] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_causal_rank_split_independent(seed, rank_path):
    """Any split into past (cache) + chunks of steps gives the whole-sequence ranks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (4,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    scores = ties_and_noise(int(cu[-1]), seed)
    whole = R.causal_rank(scores, cu)

    done = torch.zeros(4, dtype=torch.long)  # tokens of each request already processed
    got = torch.full_like(whole, float("nan"))
    while (done < lengths).any():
        step = torch.minimum(torch.randint(0, 9, (4,), generator=g), lengths - done)
        past_idx = torch.cat([torch.arange(cu[r], cu[r] + done[r]) for r in range(4)])
        step_idx = torch.cat([torch.arange(cu[r] + done[r], cu[r] + done[r] + step[r]) for r in range(4)])
        past_cu = torch.cat([torch.zeros(1, dtype=torch.long), done.cumsum(0)])
        step_cu = torch.cat([torch.zeros(1, dtype=torch.long), step.cumsum(0)])
        got[step_idx] = R.causal_rank(scores[step_idx], step_cu, scores[past_idx], past_cu)
        done += step
    assert torch.equal(got, whole)


def test_rank_looks_backwards():
    cu = torch.tensor([0, 20])
    scores = torch.randn(20, generator=torch.Generator().manual_seed(0))  # unseeded, ~5% of draws changed no rank
    before = R.causal_rank(scores, cu)
    scores[12] = 100.0
    after = R.causal_rank(scores, cu)
    assert torch.equal(before[:12], after[:12]) and not torch.equal(before[12:], after[12:])


def test_key_score_definition_and_rotated_cache():
    """score = (1/H) sum_h <qbar_h, k_kv(h)> / sqrt(d); same from post-rotary keys with qbar rotated."""
    H, KV, d, T = 6, 2, 8, 5
    qbar, k = torch.randn(H, d), torch.randn(T, KV, d)
    expected = torch.stack([sum(qbar[h] @ k[t, h // (H // KV)] for h in range(H)) / H / math.sqrt(d) for t in range(T)])
    folded = R.fold_mean_query(qbar, KV)
    torch.testing.assert_close(R.key_scores(k, folded), expected)

    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(T).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated_q = rotate(folded.expand(T, KV, d), cos, sin)
    torch.testing.assert_close(R.key_scores(rotate(k, cos, sin), rotated_q), expected)


def test_hidden_scores_equal_key_scores_and_ignore_batch_neighbours():
    """The folded key projection gives the keys' scores from the normed hidden states, and a
    token's score is bit-identical whatever other rows share the call."""
    KV, d, hidden, T = 2, 8, 24, 40
    folded, x = torch.randn(KV, d), torch.randn(T, hidden)
    wk, bk = torch.randn(KV * d, hidden), torch.randn(KV * d)
    keys = (x @ wk.T + bk).view(T, KV, d)
    weight, bias = R.fold_key_projection(folded, wk, bk)
    scores = R.hidden_scores(x, weight, bias)
    torch.testing.assert_close(scores, R.key_scores(keys, folded), rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(3, 7), slice(5, 40)):
        assert torch.equal(R.hidden_scores(x[rows].bfloat16(), weight, bias),
                           R.hidden_scores(x.bfloat16(), weight, bias)[rows])


def test_position_feature_is_relative_to_the_prompt():
    """0 at the first token, 1 at the prompt's last and on every decode token, whatever the length."""
    pos = torch.tensor([0, 2, 4, 5, 6, 0, 50, 100])
    lens = torch.tensor([5, 5, 5, 5, 5, 101, 101, 101])
    assert R.position_feature(pos, lens).tolist() == [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0]
    assert R.position_feature(torch.tensor([0, 1]), torch.tensor([1, 1])).tolist() == [0.0, 1.0]


def test_static_router_keep():
    assert R.static_router_keep(10, 0.3).tolist() == [True, False, False, False, True, True, True, True, True, True]
    assert R.static_router_keep(10, 0.0).all()
    assert R.static_router_keep(10, 1.0).tolist() == [True] + [False] * 9
    assert R.static_router_keep(5, 0.5).sum() == 3  # ceil(2.5)


def test_keep_rule_always_keeps_first_and_last_prompt_token():
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    prompt_lens = torch.tensor([4] * 6 + [3] * 3)
    logits = torch.full((9,), -5.0)
    keep = R.keep_mask(logits, positions < prompt_lens, R.always_keep_mask(positions, prompt_lens), 0.0, 0.0)
    assert keep.tolist() == [True, False, False, True, False, False, True, False, True]


def test_keep_rule_prompt_and_decode_thresholds_and_zero_targets():
    router = R.Router(2, 1, 4, min_prompt=0)
    router.set_schedule([0.0, 0.5], [0.5, 0.0])
    router.threshold_prompt.fill_(10.0)
    router.threshold_decode.fill_(10.0)
    positions, prompt_lens = torch.arange(8), torch.full((8,), 5)
    logits = torch.zeros(8)
    assert router.keep(0, logits, positions, prompt_lens).tolist() == [True] * 5 + [False] * 3
    assert router.keep(1, logits, positions, prompt_lens).tolist() == [True, False, False, False, True, True, True, True]
    router.set_schedule([0.0, 0.5], [0.0, 0.0])
    assert router.is_dense(0) and not router.is_dense(1)


@pytest.mark.parametrize("sparsity", [0.0, 0.13, 0.5, 0.77, 1.0])
def test_calibrated_threshold_hits_target(sparsity):
    logits = torch.randn(300)
    forced = torch.zeros(300, dtype=torch.bool)
    forced[::50] = True
    t = R.calibrate_threshold(logits, sparsity, forced)
    skipped = ~((logits > t) | forced)
    expected = min(sparsity, 1 - forced.float().mean().item())
    assert abs(skipped.float().mean().item() - expected) <= 0.01


def test_topk_keep_counts():
    cu = torch.tensor([0, 10, 13])
    always = torch.zeros(13, dtype=torch.bool)
    always[[0, 9, 10, 12]] = True
    keep = R.topk_keep(torch.randn(13), cu, 0.5, always)
    assert keep[:10].sum() == 5 and keep[10:].sum() == 2 and keep[always].all()


def test_router_mlp_is_the_linear_stack_and_batch_invariant():
    mlp = R.RouterMLP()
    x = torch.randn(700, R.NUM_FEATURES)
    out = mlp(x)
    assert [p.shape for p in mlp.parameters()] == [(64, 4), (64,), (1, 64), (1,)]
    torch.testing.assert_close(out, mlp.fc2(torch.nn.functional.silu(mlp.fc1(x)))[:, 0])
    assert all(torch.equal(mlp(x[a:b]), out[a:b]) for a, b in [(0, 1), (3, 9), (100, 613)])


def test_router_state_dict_round_trip():
    a = R.Router(3, 2, 4)
    a.set_schedule([0.0, 0.2, 0.4], [0.0, 0.1, 0.0])
    b = R.Router(3, 2, 4)
    b.load_state_dict(a.state_dict())
    assert b.is_dense(0) and not b.is_dense(1) and b._targets == a._targets


def test_block_logits_split_independent():
    """What a vLLM layer computes from (cached past scores, step scores) equals the whole pass."""
    torch.manual_seed(0)
    router = R.Router(2, 2, 4)
    router.set_schedule([0.0, 0.3])
    keys = torch.randn(25, 2, 4)
    router.mean_query[1] = torch.randn(2, 4)
    scores = router.block_scores(1, keys)
    whole = router.block_logits(1, scores, torch.arange(25), torch.full((25,), 20), torch.tensor([0, 25]))
    step = router.block_logits(1, scores[17:], torch.arange(17, 25), torch.full((8,), 20), torch.tensor([0, 8]),
                               scores[:17], torch.tensor([0, 17]))
    assert torch.equal(step, whole[17:])


def test_prompts_shorter_than_min_prompt_are_kept_whole():
    """Every token of a short prompt is kept; a long prompt's free tokens follow the threshold;
    decode tokens after a short prompt still follow the decode threshold."""
    router = R.Router(2, 1, 4)
    assert router.min_prompt == R.MIN_ROUTED_PROMPT == 64
    router.set_schedule([0.0, 0.5], [0.0, 0.5])
    router.threshold_prompt.fill_(10.0)
    router.threshold_decode.fill_(10.0)
    positions = torch.cat([torch.arange(66), torch.arange(70)])
    prompt_lens = torch.cat([torch.full((66,), 63), torch.full((70,), 70)])
    keep = router.keep(1, torch.zeros(136), positions, prompt_lens)
    assert keep[:63].all() and not keep[63:66].any()
    assert keep[66] and not keep[67:135].any() and keep[135]


def test_short_prompt_thresholds_follow_the_prompt_length():
    router = R.Router(2, 1, 4, min_prompt=0, short_lengths=[8, 12], threshold_length=16)
    router.set_schedule([0.5, 0.5], [0.0, 0.0])
    router.threshold_prompt.fill_(5.0)
    router.set_prompt_threshold(1, 8, 1.0)
    router.set_prompt_threshold(1, 12, 2.0)
    lens = torch.tensor([4, 8, 11, 12, 15, 16, 40])
    assert router.prompt_threshold(1, lens).tolist() == [5.0, 1.0, 1.0, 2.0, 2.0, 5.0, 5.0]
    assert router.prompt_threshold(0, lens).tolist() == [5.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]  # its own columns
    # a token at a free position with logit 1.5 is kept only where its prompt's threshold is 1
    positions = torch.full_like(lens, 2)
    assert router.keep(1, torch.full((7,), 1.5), positions, lens).tolist() == [False, True, True, False, False, False, False]
    router.set_prompt_threshold(1, 20, 7.0)
    assert router.threshold_prompt[1] == 7.0
    with pytest.raises(ValueError, match="no threshold for 10-token prompts"):
        router.set_prompt_threshold(1, 10, 0.0)
    for lengths in ([12, 8], [8, 16]):
        with pytest.raises(ValueError, match="must rise"):
            R.Router(2, 1, 4, short_lengths=lengths, threshold_length=16)
    router.threshold_decode.fill_(3.0)
    router.set_schedule([0.5, 0.5], [0.5, 0.5])
    router.keep_every_token()  # short-prompt thresholds too: the keep-all router must keep 8-token prompts
    decoding = torch.full_like(lens, 50)  # past every prompt: decode tokens
    for pos in (positions, decoding):
        assert router.keep(1, torch.full((7,), -1e6), pos, lens).all()
