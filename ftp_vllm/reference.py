"""Plain-PyTorch routed Llama / Qwen2: the definition of what a routed model computes.

It runs on a transformers model's frozen weights, in float32, over flat token
tensors (requests packed back to back, split by `cu_seqlens`), the layout the
vLLM layers see.  Per block b and token i:

- kept: the normal decoder layer (attention over the keys/values of every
  token j <= i of its request, kept or skipped; MLP; residuals);
- skipped: the hidden state passes through unchanged, but the token still
  runs input RMSNorm -> K, V (+ rotary on K) on that hidden state, and later
  tokens attend to those K/V.  No K/V is ever missing.

Computing the full block for every token and then mixing
``h_out = g * block(h) + (1 - g) * h`` is exactly this (a standard layer's K/V
already come from its input), and with a straight-through gate g it is also
the training forward.

In "threshold" mode every decision looks only backwards, so one pass over
prompt + continuation equals serving the prompt and then decoding the
continuation token by token: logits at continuation positions are what the
served request would score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import router as R


# (block, block input [T, D], block output [T, D], token layout) -> keep [T] bool, or None: dense
BlockSelector = Callable[[int, Tensor, Tensor, "Tokens"], "Tensor | None"]


@dataclass
class RoutedOutput:
    logits: Tensor  # [T, V]
    keep: Tensor  # [B, T] bool: hard decisions
    router_logits: Tensor  # [B, T]; zeros on blocks where no router ran
    keep_prob: Tensor  # [B, T] soft keep probability ("train" mode), else keep as float
    routed: list[int]  # blocks where the router ran
    hidden: list[Tensor] | None  # block inputs h_0 .. h_{B-1}, then the last block's output


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (rotate-half convention of HF Llama/Qwen2) on [T, heads, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class RoutedModel(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model.float().eval().requires_grad_(False)
        config = hf_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @classmethod
    def from_pretrained(cls, path) -> RoutedModel:
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))

    @property
    def layers(self):
        return self.hf.model.layers

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def new_router(self, min_prompt: int = R.MIN_ROUTED_PROMPT, short_lengths=(), threshold_length: int = 0) -> R.Router:
        return R.Router(self.num_blocks, self.num_kv_heads, self.head_dim, min_prompt=min_prompt,
                        short_lengths=short_lengths, threshold_length=threshold_length)

    def qkv(self, block: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-rotary q [T, H, d], k and v [T, KV, d] of hidden states h at `block`."""
        attn = self.layers[block].self_attn
        x = self.layers[block].input_layernorm(h)
        d, kv = self.head_dim, self.num_kv_heads
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        return q.view(-1, self.num_heads, d), k.view(-1, kv, d), v.view(-1, kv, d)

    def _attention(self, block: int, q, k, v, cos, sin, bounds: list[int]) -> Tensor:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            out.append(o[0].transpose(0, 1).reshape(end - start, -1))
        return self.layers[block].self_attn.o_proj(torch.cat(out))

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        prompt_lens: Tensor | None = None,
        *,
        router: R.Router | None = None,
        keep: Tensor | BlockSelector | None = None,
        mode: str = "threshold",
        temperature: float = 1.0,
        return_hidden: bool = False,
        logits_at: Tensor | None = None,
    ) -> RoutedOutput:
        """Run packed requests `input_ids` [T] split by `cu_seqlens` [R+1].

        prompt_lens [R]: tokens past it are continuation (decode rule); default all prompt.
        keep [B, T] bool: given decisions (dense, static, random, ShortGPT); or a `BlockSelector`
        that decides each block from its full output (oracles, for analysis); else `router`
        decides with `mode`: "threshold" (serving rule), "topk" (prompt: top-k per request
        at the block's sparsity), "calibrate" (set this pass's thresholds to hit the targets
        exactly, block after block, then apply them), "train" (straight-through soft gate
        at p > 0.5 with `temperature`), "train-calibrated" (the same gate at thresholds
        calibrated on this pass's logits, as serving will: every step realises the targets
        exactly and training shapes only the ranking of tokens).  No keep and no router: dense.
        logits_at: token indices whose logits to compute (the LM head over a 49k vocabulary
        costs as much as several blocks); default all.
        """
        tok = Tokens.of(cu_seqlens, prompt_lens)
        positions = tok.positions
        bounds = cu_seqlens.tolist()
        T = len(input_ids)

        h = self.hf.model.embed_tokens(input_ids)
        cos, sin = (t[0] for t in self.hf.model.rotary_emb(h[None], positions[None]))
        hidden, keeps, logits_all, probs, routed = [], [], [], [], []
        for b, layer in enumerate(self.layers):
            hidden.append(h)
            q, k, v = self.qkv(b, h)
            gate, router_logits, prob = None, h.new_zeros(T), None
            if keep is not None:
                gate = None if callable(keep) else keep[b]
            elif router is not None and not router.is_dense(b):
                routed.append(b)
                router_logits = router.block_logits(b, router.block_scores(b, k), positions, tok.prompt_lens, cu_seqlens)
                gate, prob = self._decide(router, b, router_logits, mode, temperature, tok)
            attn = self._attention(b, q, k, v, cos, sin, bounds)
            h_mid = h + attn
            h_full = h_mid + layer.mlp(layer.post_attention_layernorm(h_mid))
            if callable(keep):
                gate = keep(b, h, h_full, tok)
            if gate is None:
                h, hard = h_full, torch.ones(T, dtype=torch.bool, device=h.device)
            else:
                g = gate.to(h.dtype)[:, None]
                h, hard = h_full * g + h * (1 - g), gate.detach() > 0.5
            keeps.append(hard)
            logits_all.append(router_logits)
            probs.append(hard.float() if prob is None else prob)
        hidden.append(h)
        logits = self.hf.lm_head(self.hf.model.norm(h if logits_at is None else h[logits_at]))
        hidden = hidden if return_hidden else None
        return RoutedOutput(logits, torch.stack(keeps), torch.stack(logits_all), torch.stack(probs), routed, hidden)

    @staticmethod
    def _decide(router: R.Router, b: int, logits: Tensor, mode: str, temperature: float, tok: "Tokens"):
        if mode in ("train", "train-calibrated"):  # a kind of token with target 0 is always kept, as served
            always = router.always_keep(tok.positions, tok.prompt_lens)
            prompt_target, decode_target = router.sparsity[b].item(), router.decode_sparsity[b].item()
            if prompt_target == 0:
                always = always | tok.is_prompt
            if decode_target == 0:
                always = always | ~tok.is_prompt
            threshold = 0.0
            if mode == "train-calibrated":
                p, d = tok.is_prompt, ~tok.is_prompt
                detached = logits.detach()
                forced = router.always_keep(tok.positions, tok.prompt_lens)
                tp = R.calibrate_threshold(detached[p], prompt_target, forced[p]) if p.any() else 0.0
                td = R.calibrate_threshold(detached[d], decode_target, forced[d]) if d.any() else 0.0
                threshold = torch.where(p, torch.tensor(tp), torch.tensor(td))
            return R.soft_gate(logits, always, threshold, temperature)
        if mode == "calibrate":
            p, d = tok.is_prompt, ~tok.is_prompt
            prompt_target, decode_target = router.sparsity[b].item(), router.decode_sparsity[b].item()
            forced = router.always_keep(tok.positions, tok.prompt_lens)
            if p.any():
                lengths = tok.prompt_lens[p].unique().tolist()
                if router.short_lengths and len(lengths) > 1:
                    raise ValueError(f"calibrate one prompt length at a time for a router with short-prompt "
                                     f"thresholds (got {lengths})")
                value = R.calibrate_threshold(logits[p], prompt_target, forced[p])
                router.set_prompt_threshold(b, max(lengths), value)
            if d.any():
                router.threshold_decode[b] = R.calibrate_threshold(logits[d], decode_target, forced[d])
        elif mode not in ("threshold", "topk"):
            raise ValueError(f"unknown routing mode {mode!r}")
        keep = router.keep(b, logits, tok.positions, tok.prompt_lens)
        if mode == "topk":
            keep = _prompt_topk(logits, tok, router.sparsity[b].item(), keep)
        return keep, None


@dataclass
class Tokens:
    """Per-token layout of a packed batch."""

    positions: Tensor
    prompt_lens: Tensor  # per token
    is_prompt: Tensor
    always: Tensor
    prompt_cu: Tensor  # cu_seqlens of the prompt parts alone
    requests: Tensor  # each token's request

    @classmethod
    def of(cls, cu_seqlens: Tensor, prompt_lens: Tensor | None) -> Tokens:
        rid = R.request_ids(cu_seqlens)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        per_request = lengths if prompt_lens is None else torch.minimum(prompt_lens, lengths)
        positions = R.local_index(cu_seqlens)
        token_prompt_lens = per_request[rid]
        prompt_cu = F.pad(per_request.cumsum(0), (1, 0))
        always = R.always_keep_mask(positions, token_prompt_lens)
        return cls(positions, token_prompt_lens, positions < token_prompt_lens, always, prompt_cu, rid)


# ---- calibration helpers ---------------------------------------------------

@torch.no_grad()
def calibrate_router_inputs(model: RoutedModel, router: R.Router, input_ids: Tensor, cu_seqlens: Tensor) -> None:
    """Set the router's mean queries and feature statistics from a dense pass over calibration
    text.  Position 0 is left out: it is always kept and, as the attention sink, an outlier."""
    out = model(input_ids, cu_seqlens, return_hidden=True, logits_at=input_ids.new_zeros(0))
    tok = Tokens.of(cu_seqlens, None)
    later = tok.positions > 0
    for b in range(model.num_blocks):
        q, k, _ = model.qkv(b, out.hidden[b])
        router.mean_query[b] = R.fold_mean_query(q[later].mean(0), model.num_kv_heads)
        raw = router.block_features(b, router.block_scores(b, k), tok.positions, tok.prompt_lens, cu_seqlens)[later]
        router.feature_mean[b], router.feature_std[b] = raw.mean(0), raw.std(0).clamp_min(1e-6)
        router.feature_mean[b, 3], router.feature_std[b, 3] = 0.0, 1.0  # sparsity: constant within a block


@torch.no_grad()
def calibrate_router_thresholds(
    model: RoutedModel,
    router: R.Router,
    input_ids: Tensor,
    cu_seqlens: Tensor,
    prompt_lens: Tensor | None = None,
    logits_at: Tensor | None = None,
) -> RoutedOutput:
    """Set prompt (and, with continuations, decode) thresholds block by block on the routed pass
    itself, so each block's realised sparsity on this text equals its target."""
    return model(input_ids, cu_seqlens, prompt_lens, router=router, mode="calibrate", logits_at=logits_at)


@torch.no_grad()
def calibrate_short_thresholds(model: RoutedModel, router: R.Router, prompts: Tensor) -> dict[int, int]:
    """Fill `router.threshold_short`: for each short length L, the calibration prompts [N, n]
    cut into windows of L tokens are routed as prompts and each block's threshold set on them,
    block by block, as `calibrate_router_thresholds` does for full-length prompts.  Returns the
    number of windows per length."""
    windows = {}
    for L in router.short_lengths:
        ids, cu, prompt_lens = prompt_windows(prompts, L)
        if not len(prompt_lens):
            raise ValueError(f"calibration prompts of {prompts.shape[1]} tokens are shorter than {L}")
        calibrate_router_thresholds(model, router, ids, cu, prompt_lens, logits_at=ids.new_zeros(0))
        windows[L] = len(prompt_lens)
    return windows


def prompt_windows(prompts: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts [N, n] cut into N * (n // length) consecutive windows of `length` tokens (the rest
    dropped), packed as requests that are all prompt: (input_ids, cu_seqlens, prompt_lens)."""
    cut = prompts[:, : prompts.shape[1] // length * length].reshape(-1, length)
    cu = torch.arange(len(cut) + 1, device=cut.device) * length
    return cut.reshape(-1), cu, torch.full((len(cut),), length, device=cut.device)


def short_prompt_lengths(min_prompt: int, threshold_length: int) -> list[int]:
    """Prompt lengths to calibrate short-prompt thresholds at: from `min_prompt` up in steps of
    at most a quarter (multiples of 16 from 64 tokens on), below `threshold_length`."""
    lengths, n = [], max(1, min_prompt)
    while n < threshold_length:
        lengths.append(n)
        step = n // 4
        n += max(1, step // 16 * 16 if n >= 64 else step)
    return lengths


@torch.no_grad()
def block_influence(model: RoutedModel, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    """ShortGPT's Block Influence [B]: mean over tokens of 1 - cos(block input, block output)."""
    hidden = model(input_ids, cu_seqlens, return_hidden=True).hidden
    return torch.stack([1 - F.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(hidden[:-1], hidden[1:])])


# ---- baseline decisions [B, T] ----------------------------------------------

def static_keep(cu_seqlens: Tensor, sparsity, prompt_lens: Tensor | None = None) -> Tensor:
    """Static router on each prompt at each block's sparsity; the always-kept tokens too.
    Continuation tokens are kept: a decode token is the most recent token, which it keeps."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    rows = []
    for s in sparsity:
        keep = tok.always | ~tok.is_prompt
        bounds, prompt = cu_seqlens.tolist(), tok.prompt_cu.tolist()
        for r, start in enumerate(bounds[:-1]):
            n = prompt[r + 1] - prompt[r]
            keep[start:start + n] |= R.static_router_keep(n, float(s))
        rows.append(keep)
    return torch.stack(rows)


def random_keep(cu_seqlens: Tensor, sparsity, prompt_lens: Tensor | None = None, generator=None) -> Tensor:
    """Random token choice at each block's sparsity (always-kept tokens and continuation kept)."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    noise = torch.rand(len(sparsity), len(tok.positions), generator=generator)
    return torch.stack([_prompt_topk(n, tok, float(s)) for n, s in zip(noise, sparsity)])


def change_selector(sparsity, recency: float = 0.0) -> BlockSelector:
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
        return _prompt_topk(score, tok, float(sparsity[b]))

    return select


def _prompt_topk(scores: Tensor, tok: Tokens, sparsity: float, keep: Tensor | None = None) -> Tensor:
    """Top-k of each prompt by `scores`; other tokens keep `keep` (default: kept)."""
    keep = torch.ones_like(tok.always) if keep is None else keep.clone()
    keep[tok.is_prompt] = R.topk_keep(scores[tok.is_prompt], tok.prompt_cu, sparsity, tok.always[tok.is_prompt])
    return keep


def shortgpt_keep(num_blocks: int, num_tokens: int, dropped) -> Tensor:
    """ShortGPT: the dropped blocks skip every token."""
    keep = torch.ones(num_blocks, num_tokens, dtype=torch.bool)
    keep[list(dropped)] = False
    return keep


def shortgpt_blocks(influence: Tensor, n: int) -> list[int]:
    """The n blocks of lowest Block Influence."""
    return sorted(influence.argsort()[:n].tolist())
