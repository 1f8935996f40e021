"""How a routed vLLM model reads a scheduler step, without an engine: which steps route at all,
and which requests a block decides on (the others' tokens are kept by the keep rule anyway)."""

from types import SimpleNamespace

import pytest
import torch

from ftp_vllm.models import routing
from ftp_vllm.models.routing import RoutingState
from ftp_vllm.ladder import Ladder
from ftp_vllm.models.step import StepPrompts, StepRouting
from ftp_vllm.router import Router, hidden_scores, local_index, request_ids

BLOCK_SIZE = 16


def step_metadata(requests):
    """Attention metadata of one step from (prompt length, past tokens, step tokens) per request,
    each request's cache in pages of its own."""
    lengths = [n for _, _, n in requests]
    seq_lens = [past + n for _, past, n in requests]
    pages = [-(-s // BLOCK_SIZE) for s in seq_lens]
    block_table = torch.zeros(len(requests), max(pages), dtype=torch.int32)
    first = 0
    for r, n in enumerate(pages):
        block_table[r, :n] = torch.arange(first, first + n).flip(0)  # pages out of order
        first += n
    positions = torch.cat([torch.arange(past, past + n) for _, past, n in requests])
    rid = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(lengths))
    slots = block_table[rid, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    metadata = SimpleNamespace(num_actual_tokens=len(positions), query_start_loc=torch.tensor([0, *lengths]).cumsum(0),
                               slot_mapping=slots, block_table=block_table, seq_lens=torch.tensor(seq_lens))
    StepPrompts.prompt_lens = torch.tensor([p for p, _, _ in requests])
    return metadata, positions, first * BLOCK_SIZE


@pytest.fixture
def state(monkeypatch):
    monkeypatch.setattr(routing, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(StepPrompts, "prompt_lens", None)
    router = Router(3, 1, 4, min_prompt=64)
    router.set_schedule([0.0, 0.3, 0.3], [0.0, 0.0, 0.2])  # block 2 routes decode tokens too
    router.threshold_prompt.fill_(0.1)
    router.threshold_decode.fill_(-0.1)
    s = RoutingState(Ladder([router], [0.2]), {}, BLOCK_SIZE)
    s.score_weight, s.score_bias = torch.randn(3, 8), torch.randn(3)
    return s


def begin(state, requests):
    metadata, positions, num_slots = step_metadata(requests)
    state.step = StepRouting.of(metadata, positions, state.ladder)
    state.step.with_context(metadata, BLOCK_SIZE)
    return metadata, positions, num_slots


def test_steps_without_a_routable_token_route_nowhere(state):
    begin(state, [(80, 99, 1), (30, 0, 30)])  # a decode token and a prompt too short to route
    assert state.step.num_prompt == 30 and state.step.num_routed_prompt == 0
    assert not state.routes(0) and not state.routes(1)
    assert state.routes(2)  # it routes decode tokens
    begin(state, [(80, 99, 1), (100, 50, 50)])  # a chunk of a long prompt
    assert state.step.num_routed_prompt == 50 and state.routes(1)


def test_blocks_decide_on_the_requests_they_route_as_on_the_whole_step(state):
    """Decisions on the chosen requests alone equal those of the whole step, every request
    ranked against its own past (scores of earlier steps in the score cache)."""
    requests = [(80, 99, 1), (100, 50, 50), (30, 0, 30), (120, 0, 70)]
    metadata, positions, num_slots = begin(state, requests)
    state.score_cache = torch.randn(3, num_slots)
    normed = torch.randn(len(positions), 8)
    cu = metadata.query_start_loc
    n_past = metadata.seq_lens - (cu[1:] - cu[:-1])
    past_cu = torch.cat([torch.zeros(1, dtype=torch.long), n_past.cumsum(0)])
    rid, pos = request_ids(past_cu), local_index(past_cu)
    past_slots = metadata.block_table[rid, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    router, step = state.router, state.step
    for block, chosen in ((1, [1, 3]), (2, [0, 1, 3])):
        past = state.score_cache[block, past_slots].clone()
        got = state.decide(block, normed, None, positions, num_slots)
        scores = hidden_scores(normed, state.score_weight[block], state.score_bias[block])
        logits = router.block_logits(block, scores, positions, step.prompt_lens, cu, past, past_cu)
        want = router.keep(block, logits, positions, step.prompt_lens)
        assert torch.equal(got, want)
        assert not want.all() and want[cu[2]:cu[3]].all()  # some skipped; the short prompt kept
        batch = state._decision_batch(block)  # made by `decide`, once per step
        tokens = torch.cat([torch.arange(cu[r], cu[r + 1]) for r in chosen])
        assert torch.equal(batch.tokens, tokens)
        assert torch.equal(batch.past_slots, torch.cat([past_slots[past_cu[r]:past_cu[r + 1]] for r in chosen]))


def test_realised_sparsity_counts_decisions_and_blocks_that_keep_every_token(state):
    """Decided blocks count their keep masks; a block that keeps every token of the step counts
    all of them, once, when the step ends."""
    requests = [(80, 99, 1), (100, 50, 50), (120, 0, 70)]
    metadata, positions, num_slots = begin(state, requests)
    state.score_cache = torch.zeros(3, num_slots)
    normed = torch.randn(len(positions), 8)
    state.keep_all(2, torch.randn(len(positions)), num_slots)
    keep = state.decide(1, normed, None, positions, num_slots)
    state.end_step(positions)
    counts = state.telemetry.counts[1].tolist()  # the router's rung (0 is the dense one)
    num_prompt = 120
    assert counts[2] == [num_prompt, num_prompt, 1, 1]
    is_prompt = state.step.is_prompt
    assert counts[1] == [int((keep & is_prompt).sum()), num_prompt, int((keep & ~is_prompt).sum()), 1]
    assert counts[1][0] < num_prompt
    assert counts[0] == [0, 0, 0, 0]
    stats = state.stats()
    assert (stats["prompt_tokens"], stats["decode_tokens"]) == (num_prompt, 1)
    assert stats["prompt_sparsity"] == pytest.approx((num_prompt - counts[1][0]) / (3 * num_prompt))


def test_settings_are_read_when_a_model_is_built(monkeypatch):
    """One process may build several engines under different settings: each reads its own."""
    router = Router(3, 1, 4)
    monkeypatch.setenv("FTP_VLLM_PATH", "simple")
    monkeypatch.setenv("FTP_VLLM_SCORE", "keys")
    assert not RoutingState(Ladder([router], [0.2]), {}, BLOCK_SIZE).fast
    assert RoutingState(Ladder([router], [0.2]), {}, BLOCK_SIZE).scores_keys
    monkeypatch.delenv("FTP_VLLM_PATH")
    monkeypatch.delenv("FTP_VLLM_SCORE")
    state = RoutingState(Ladder([router], [0.2]), {}, BLOCK_SIZE)
    assert state.fast and not state.scores_keys
