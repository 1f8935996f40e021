"""What FTP is compared with: other ways to choose which tokens skip which blocks.

- static router: each prompt keeps its most recent tokens at each block's
  sparsity (FTP's guide and its schedule search's first router);
- random token choice at the same sparsities;
- ShortGPT: the blocks of lowest Block Influence dropped, for every token or
  (under FTP's serving rule) for prompt tokens only;
- the change oracle: the tokens a block changes most, known only from the
  block's output, so a ceiling for analysis rather than a servable rule.

Keep decisions are [B, T] bool masks over a packed batch (`reference.GivenMasks`);
a `KeepRule` makes them for any batch, as the evaluation runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import router as R
from .reference import Oracle, RoutedModel, Tokens, is_prompt, prompt_topk

KeepRule = Callable[[Tensor, Tensor], Tensor]  # (cu_seqlens, prompt_lens [R]) -> keep [B, T]


# ---- keep masks of one batch -------------------------------------------------------

def static_keep(cu_seqlens: Tensor, sparsity, prompt_lens: Tensor | None = None, min_prompt: int = 0) -> Tensor:
    """Static router on each prompt at each block's sparsity; the always-kept tokens too.
    Continuation tokens are kept: a decode token is the most recent token, which it keeps.
    A prompt shorter than `min_prompt` is kept whole, as a router with that `min_prompt` serves it."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    rows = []
    for s in sparsity:
        keep = tok.always | ~tok.is_prompt
        bounds, prompt = cu_seqlens.tolist(), tok.prompt_cu.tolist()
        for r, start in enumerate(bounds[:-1]):
            n = prompt[r + 1] - prompt[r]
            keep[start:start + n] |= R.static_router_keep(n, float(s) if n >= min_prompt else 0.0)
        rows.append(keep)
    return torch.stack(rows)


def random_keep(cu_seqlens: Tensor, sparsity, prompt_lens: Tensor | None = None, generator=None) -> Tensor:
    """Random token choice at each block's sparsity (always-kept tokens and continuation kept)."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    noise = torch.rand(len(sparsity), len(tok.positions), generator=generator)
    return torch.stack([prompt_topk(n, tok, float(s)) for n, s in zip(noise, sparsity)])


def shortgpt_keep(num_blocks: int, num_tokens: int, dropped) -> Tensor:
    """ShortGPT: the dropped blocks skip every token."""
    keep = torch.ones(num_blocks, num_tokens, dtype=torch.bool)
    keep[list(dropped)] = False
    return keep


def change_oracle(sparsity, recency: float = 0.0) -> Oracle:
    """An oracle for analysis, not a servable rule (it needs the block's output): each prompt
    keeps the top-k tokens, at each block's sparsity, by how much the block changes them,
    1 - cos(input, output) standardised within the request, plus `recency` x pos (the static
    router's order by recency; 0: the change alone).  Always-kept tokens and continuation kept."""

    def select(b: int, h_in: Tensor, h_out: Tensor, tok: Tokens) -> Tensor | None:
        if sparsity[b] == 0:
            return None
        change = 1 - F.cosine_similarity(h_in, h_out, dim=-1)
        count = torch.bincount(tok.requests).float()[tok.requests]
        mean = torch.bincount(tok.requests, change)[tok.requests] / count
        std = (torch.bincount(tok.requests, (change - mean) ** 2)[tok.requests] / count).sqrt()
        score = (change - mean) / std.clamp_min(1e-6) + recency * R.position_feature(tok.positions, tok.prompt_lens)
        return prompt_topk(score, tok, float(sparsity[b]))

    return Oracle(select)


# ---- rules for any batch -----------------------------------------------------------

def static_rule(schedule: Sequence[float], min_prompt: int = 0) -> KeepRule:
    """Static router on prompts of `min_prompt` tokens or more (shorter ones run dense); a decode
    token is the most recent token, which it keeps."""

    def rule(cu, prompt_lens):
        if not prompt_lens.any():
            return torch.ones(len(schedule), int(cu[-1]), dtype=torch.bool)
        return static_keep(cu, schedule, prompt_lens, min_prompt)

    return rule


def random_rule(schedule: Sequence[float], decode_schedule: Sequence[float], seed: int = 0) -> KeepRule:
    """Random token choice: each prompt keeps a random k at its block's sparsity (the
    always-kept tokens too); each decode token is skipped with its block's decode sparsity."""
    generator = torch.Generator().manual_seed(seed)
    decode = torch.tensor(list(decode_schedule), dtype=torch.float32)[:, None]

    def rule(cu, prompt_lens):
        prompt = is_prompt(cu, prompt_lens)
        keep = torch.ones(len(schedule), len(prompt), dtype=torch.bool)
        if prompt.any():
            keep = random_keep(cu, schedule, prompt_lens, generator)
        skip = torch.rand(keep.shape, generator=generator) < decode
        return keep & ~(skip & ~prompt)

    return rule


def shortgpt_rule(num_blocks: int, dropped: Sequence[int]) -> KeepRule:
    return lambda cu, prompt_lens: shortgpt_keep(num_blocks, int(cu[-1]), dropped)


def shortgpt_prompt_rule(num_blocks: int, dropped: Sequence[int]) -> KeepRule:
    """ShortGPT's blocks dropped under FTP's serving rule: every prompt token skips them, decode
    tokens run every block (attending to the skipped tokens' K/V, as with a router)."""

    def rule(cu, prompt_lens):
        keep = shortgpt_keep(num_blocks, int(cu[-1]), dropped)
        keep[list(dropped)] = ~is_prompt(cu, prompt_lens)
        return keep

    return rule


# ---- schedules and block choice ----------------------------------------------------

def uniform_schedule(num_blocks: int, sparsity: float, dense_edges: int) -> list[float]:
    """`sparsity` on average over all blocks, spread evenly over the blocks between the
    `dense_edges` first and last ones (kept dense: skipping there ruins a small model)."""
    free = num_blocks - 2 * dense_edges
    rate = min(1.0, sparsity * num_blocks / free)
    return [rate if dense_edges <= b < num_blocks - dense_edges else 0.0 for b in range(num_blocks)]


@torch.no_grad()
def block_influence(model: RoutedModel, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    """ShortGPT's Block Influence [B]: mean over tokens of 1 - cos(block input, block output)."""
    hidden = model(input_ids, cu_seqlens, return_hidden=True).hidden
    return torch.stack([1 - F.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(hidden[:-1], hidden[1:])])


def calibration_block_influence(model: RoutedModel, tokenizer, chunks: int = 8, seed: int = 0) -> Tensor:
    """ShortGPT's Block Influence [B] on `chunks` 256-token chunks of calibration text."""
    from .texts import token_chunks

    cal = token_chunks(tokenizer, "calibration", 256, chunks, seed)
    return block_influence(model, cal.reshape(-1), torch.arange(len(cal) + 1) * cal.shape[1])


def shortgpt_blocks(influence: Tensor, n: int) -> list[int]:
    """The n blocks of lowest Block Influence."""
    return sorted(influence.argsort()[:n].tolist())
