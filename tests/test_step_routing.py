"""How a routed vLLM model reads a scheduler step, without an engine: which steps route at all,
and which requests a block decides on (the others' tokens are kept by the keep rule anyway)."""

from types import SimpleNamespace

import pytest
import torch

from ftp_vllm.models import routed
from ftp_vllm.router import Router

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
    routed._StepPrompts.prompt_lens = torch.tensor([p for p, _, _ in requests])
    return metadata, positions, first * BLOCK_SIZE


@pytest.fixture
def state(monkeypatch):
    monkeypatch.setattr(routed, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(routed._StepPrompts, "prompt_lens", None)
    router = Router(3, 1, 4, min_prompt=64)
    router.set_schedule([0.0, 0.3, 0.3], [0.0, 0.0, 0.2])  # block 2 routes decode tokens too
    router.threshold_prompt.fill_(0.1)
    router.threshold_decode.fill_(-0.1)
    s = routed.RoutingState(router, {}, BLOCK_SIZE)
    s.score_weight, s.score_bias = torch.randn(3, 8), torch.randn(3)
    return s


def begin(state, requests):
    metadata, positions, num_slots = step_metadata(requests)
    state.step = routed.StepRouting.of(metadata, positions, state.router.routes_prompt)
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
    rid, pos = routed.request_ids(past_cu), routed.local_index(past_cu)
    past_slots = metadata.block_table[rid, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    router, step = state.router, state.step
    for block, chosen in ((1, [1, 3]), (2, [0, 1, 3])):
        past = state.score_cache[block, past_slots].clone()
        got = state.decide(block, normed, None, positions, num_slots)
        scores = routed.hidden_scores(normed, state.score_weight[block], state.score_bias[block])
        logits = router.block_logits(block, scores, positions, step.prompt_lens, cu, past, past_cu)
        want = router.keep(block, logits, positions, step.prompt_lens)
        assert torch.equal(got, want)
        assert not want.all() and want[cu[2]:cu[3]].all()  # some skipped; the short prompt kept
        batch = step.batches[(True, block == 2)]
        tokens = torch.cat([torch.arange(cu[r], cu[r + 1]) for r in chosen])
        assert torch.equal(batch.tokens, tokens)
        assert torch.equal(batch.past_slots, torch.cat([past_slots[past_cu[r]:past_cu[r + 1]] for r in chosen]))
