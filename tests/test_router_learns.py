"""Router training learns what the static rule cannot: a tiny model in which only some tokens
matter, and they are not the most recent ones.

The tiny Llama's weights are changed so that a set of marker tokens carries each request
(`marker_model`): their embeddings share a direction that every block's key projection maps
onto the slowest rotary pair, which every query reads through a direction all embeddings share.
So every later token attends almost only to markers, and the router's attention-score feature
(the key's logit under the mean query) marks them.  Markers sit at random places in each prompt,
so the static rule (keep the most recent tokens) keeps about half of them, as does any rule by
position; only a router that learned to read the score keeps them all.  The final norm is scaled
so that skipping markers costs a next-token KL of the size real text gives (a few tenths).

Everything else is the real training: `fit_guide`'s warm start (the static rule), then
`train_router` with FTP's three losses, the calibrated gate and an annealed temperature, then
thresholds calibrated on calibration text and decisions served on other text.
"""

import torch

from ftp_vllm.baselines import static_keep
from ftp_vllm.evaluation import ContinuationBatch, continuation_logprobs, kl_and_nll
from ftp_vllm.reference import (
    GivenMasks, RoutedModel, Served, calibrate_router_inputs, calibrate_router_thresholds, is_prompt,
)
from ftp_vllm.train import fit_guide, train_router

MARKERS = torch.arange(10, 20)
SCHEDULE = [0.0, 0.5, 0.5, 0.0]
ROUTED = [b for b, s in enumerate(SCHEDULE) if s > 0]
PROMPT, CONTINUATION = 48, 8


@torch.no_grad()
def marker_model(folder) -> RoutedModel:
    """The tiny Llama in which only marker tokens matter (see the module's docstring)."""
    model = RoutedModel.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(model.hf.config.hidden_size, 2, generator=g))
    marker, shared = basis.T
    embed = model.hf.model.embed_tokens.weight
    embed += 2.0 * shared
    embed[MARKERS] += 2.0 * marker
    slow = model.head_dim - 1  # the rotary pair of the lowest frequency: nearly position-free
    for layer in model.layers:
        attn = layer.self_attn
        attn.k_proj.weight.view(model.num_kv_heads, model.head_dim, -1)[:, slow] += 3.0 * marker
        attn.q_proj.weight.view(model.num_heads, model.head_dim, -1)[:, slow] += 3.0 * shared
        attn.o_proj.weight *= 4.0
        layer.mlp.down_proj.weight *= 4.0
    model.hf.model.norm.weight *= 3.0
    return model


def marked_text(chunks: int, seed: int, markers: int = 6) -> ContinuationBatch:
    """Random tokens with `markers` marker tokens at random places in each prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (chunks, PROMPT + CONTINUATION), generator=g)
    for row in ids:
        places = torch.randperm(PROMPT - 2, generator=g)[:markers] + 1
        row[places] = MARKERS[torch.randint(0, len(MARKERS), (markers,), generator=g)]
    return ContinuationBatch.of(ids, PROMPT)


def markers_kept(keep: torch.Tensor, text: ContinuationBatch) -> float:
    """Share of marker tokens the routed blocks keep."""
    return keep[ROUTED][:, torch.isin(text.input_ids, MARKERS)].float().mean().item()


@torch.no_grad()
def served(model, router, calib: ContinuationBatch, text: ContinuationBatch):
    """Marker share kept and prompt sparsity realised on `text` at thresholds calibrated on `calib`."""
    calibrate_router_thresholds(model, router, calib.input_ids, calib.cu_seqlens, calib.prompt_lens)
    keep = model(text.input_ids, text.cu_seqlens, text.prompt_lens, keep=Served(router)).keep
    prompt = is_prompt(text.cu_seqlens, text.prompt_lens)
    return markers_kept(keep, text), 1 - keep[ROUTED][:, prompt].float().mean().item()


def continuation_kl(model, text: ContinuationBatch, keep) -> float:
    dense = continuation_logprobs(model, text)
    return kl_and_nll(continuation_logprobs(model, text, keep), dense, text.targets)[0]


def test_training_learns_the_tokens_that_matter_where_the_static_rule_is_wrong(tiny_llama):
    model = marker_model(tiny_llama)
    calib, held_out = marked_text(8, seed=1), marked_text(8, seed=2)
    router = model.new_router(min_prompt=0)
    router.set_schedule(SCHEDULE, [0.0] * len(SCHEDULE))
    calibrate_router_inputs(model, router, calib.input_ids, calib.cu_seqlens)
    fit_guide(model, router, calib.input_ids, calib.cu_seqlens, calib.prompt_lens, steps=100)

    static = static_keep(held_out.cu_seqlens, SCHEDULE, held_out.prompt_lens)
    static_share = markers_kept(static, held_out)
    warm_share, _ = served(model, router, calib, held_out)
    assert 0.3 < static_share < 0.7 and abs(warm_share - static_share) < 0.1, (static_share, warm_share)

    batches = [(b.input_ids, b.cu_seqlens, b.scored, b.prompt_lens) for b in map(marked_text, [4] * 4, range(10, 14))]
    train_router(model, router, batches, steps=30, lr=1e-2, temperature=(8.0, 1.0), calibrated=True)
    trained_share, sparsity = served(model, router, calib, held_out)
    assert trained_share > 0.9 and trained_share > static_share + 0.25, (static_share, warm_share, trained_share)
    assert abs(sparsity - 0.5) < 0.05, sparsity  # the same rate: the router chose other tokens, not fewer
    trained_kl = continuation_kl(model, held_out, Served(router))
    static_kl = continuation_kl(model, held_out, GivenMasks(static))
    assert trained_kl < 0.75 * static_kl, (trained_kl, static_kl)
