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

Which tokens run a block is a `KeepPolicy`'s decision: every token
(`Dense`), masks given in advance (`GivenMasks`, the baselines), a router's
serving rule (`Served`), its prompt top-k (`PromptTopK`), the serving rule at
thresholds fitted on the pass itself (`Calibrating`), the training gate
(`TrainingGate`), or an oracle that looks at the block's output (`Oracle`).

Under `Served` every decision looks only backwards, so one pass over prompt +
continuation equals serving the prompt and then decoding the continuation
token by token: logits at continuation positions are what the served request
would score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import router as R


@dataclass
class RoutedOutput:
    logits: Tensor  # [T, V]
    keep: Tensor  # [B, T] bool: hard decisions
    router_logits: Tensor  # [B, T]; zeros on blocks where no router ran
    keep_prob: Tensor  # [B, T] soft keep probability (training gate), else keep as float
    routed: list[int]  # blocks where the router ran
    hidden: list[Tensor] | None  # block inputs h_0 .. h_{B-1}, then the last block's output


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (rotate-half convention of HF Llama/Qwen2) on [T, heads, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# ---- token layout ------------------------------------------------------------------

@dataclass
class Tokens:
    """Per-token layout of a packed batch."""

    positions: Tensor
    prompt_lens: Tensor  # per token
    is_prompt: Tensor
    always: Tensor
    prompt_cu: Tensor  # cu_seqlens of the prompt parts alone
    requests: Tensor  # each token's request
    cu_seqlens: Tensor

    @classmethod
    def of(cls, cu_seqlens: Tensor, prompt_lens: Tensor | None) -> Tokens:
        rid = R.request_ids(cu_seqlens)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        per_request = lengths if prompt_lens is None else torch.minimum(prompt_lens, lengths)
        positions = R.local_index(cu_seqlens)
        token_prompt_lens = per_request[rid]
        prompt_cu = F.pad(per_request.cumsum(0), (1, 0))
        always = R.always_keep_mask(positions, token_prompt_lens)
        return cls(positions, token_prompt_lens, positions < token_prompt_lens, always, prompt_cu, rid, cu_seqlens)


def is_prompt(cu_seqlens: Tensor, prompt_lens: Tensor) -> Tensor:
    """[T] bool: the tokens of each request before its `prompt_lens` [R]."""
    return R.local_index(cu_seqlens) < prompt_lens[R.request_ids(cu_seqlens)]


def prompt_topk(scores: Tensor, tok: Tokens, sparsity: float, keep: Tensor | None = None) -> Tensor:
    """Top-k of each prompt by `scores`; other tokens keep `keep` (default: kept)."""
    keep = torch.ones_like(tok.always) if keep is None else keep.clone()
    keep[tok.is_prompt] = R.topk_keep(scores[tok.is_prompt], tok.prompt_cu, sparsity, tok.always[tok.is_prompt])
    return keep


# ---- keep policies -------------------------------------------------------------------

@dataclass
class Decision:
    """One block's decision for every token of the pass."""

    gate: Tensor | None = None  # [T]: bool, or a straight-through float gate; None: every token runs
    router_logits: Tensor | None = None  # [T], where a router scored the tokens
    keep_prob: Tensor | None = None  # [T] soft keep probability of a training gate


class KeepPolicy:
    """Decides block by block which tokens run the block.  `decide` sees what a router sees
    (the block's input keys); `revise` may look at the full block output, which only an
    oracle for analysis does.  The base policy keeps every token."""

    def decide(self, block: int, k: Tensor, tok: Tokens) -> Decision:
        return Decision()

    def revise(self, block: int, h_in: Tensor, h_out: Tensor, tok: Tokens, decision: Decision) -> Decision:
        return decision


class Dense(KeepPolicy):
    """Every token runs every block."""


@dataclass
class GivenMasks(KeepPolicy):
    """Decisions known in advance, [B, T] bool: dense, static, random, ShortGPT."""

    masks: Tensor

    def decide(self, block: int, k: Tensor, tok: Tokens) -> Decision:
        return Decision(self.masks[block])


# (block, block input [T, D], block output [T, D], token layout) -> keep [T] bool, or None: dense
BlockSelector = Callable[[int, Tensor, Tensor, Tokens], "Tensor | None"]


@dataclass
class Oracle(KeepPolicy):
    """Decides each block from its full output: for analysis, not a servable rule."""

    select: BlockSelector

    def revise(self, block: int, h_in: Tensor, h_out: Tensor, tok: Tokens, decision: Decision) -> Decision:
        return Decision(self.select(block, h_in, h_out, tok))


@dataclass
class Served(KeepPolicy):
    """The router's serving rule at its thresholds."""

    router: R.Router

    def decide(self, block: int, k: Tensor, tok: Tokens) -> Decision:
        if self.router.is_dense(block):
            return Decision()
        router = self.router
        logits = router.block_logits(block, router.block_scores(block, k), tok.positions, tok.prompt_lens,
                                     tok.cu_seqlens)
        return self.gate(block, logits, tok)

    def gate(self, block: int, logits: Tensor, tok: Tokens) -> Decision:
        return Decision(self.router.keep(block, logits, tok.positions, tok.prompt_lens), logits)


class PromptTopK(Served):
    """Each prompt keeps its top-k tokens by router logit at the block's sparsity; other tokens
    as served."""

    def gate(self, block: int, logits: Tensor, tok: Tokens) -> Decision:
        served = self.router.keep(block, logits, tok.positions, tok.prompt_lens)
        return Decision(prompt_topk(logits, tok, self.router.sparsity[block].item(), served), logits)


class Calibrating(Served):
    """The serving rule at thresholds set, block after block, so this pass realises each block's
    targets exactly (`calibrate_block_thresholds`); the router keeps them."""

    def gate(self, block: int, logits: Tensor, tok: Tokens) -> Decision:
        calibrate_block_thresholds(self.router, block, logits, tok)
        return super().gate(block, logits, tok)


@dataclass
class TrainingGate(Served):
    """Straight-through soft gate: p > 0.5 at `temperature`, or, `calibrated`, at thresholds
    calibrated on this pass's logits as serving will, so every step realises the targets exactly
    and training shapes only the ranking of tokens.  A kind of token with target 0 is always
    kept, as served."""

    temperature: float = 1.0
    calibrated: bool = False

    def gate(self, block: int, logits: Tensor, tok: Tokens) -> Decision:
        router = self.router
        always = router.always_keep(tok.positions, tok.prompt_lens)
        prompt_target, decode_target = router.sparsity[block].item(), router.decode_sparsity[block].item()
        if prompt_target == 0:
            always = always | tok.is_prompt
        if decode_target == 0:
            always = always | ~tok.is_prompt
        threshold = self._thresholds(block, logits.detach(), tok) if self.calibrated else 0.0
        gate, prob = R.soft_gate(logits, always, threshold, self.temperature)
        return Decision(gate, logits, prob)

    def _thresholds(self, block: int, logits: Tensor, tok: Tokens) -> Tensor:
        router = self.router
        p, d = tok.is_prompt, ~tok.is_prompt
        forced = router.always_keep(tok.positions, tok.prompt_lens)
        tp = R.calibrate_threshold(logits[p], router.sparsity[block].item(), forced[p]) if p.any() else 0.0
        td = R.calibrate_threshold(logits[d], router.decode_sparsity[block].item(), forced[d]) if d.any() else 0.0
        return torch.where(p, torch.tensor(tp), torch.tensor(td))


# ---- the model ---------------------------------------------------------------------

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

    def _block_output(self, block: int, h: Tensor, q, k, v, cos, sin, bounds: list[int]) -> Tensor:
        """The decoder layer's output for every token (attention and MLP, with residuals)."""
        layer = self.layers[block]
        h_mid = h + self._attention(block, q, k, v, cos, sin, bounds)
        return h_mid + layer.mlp(layer.post_attention_layernorm(h_mid))

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        prompt_lens: Tensor | None = None,
        *,
        keep: KeepPolicy | None = None,
        return_hidden: bool = False,
        logits_at: Tensor | None = None,
    ) -> RoutedOutput:
        """Run packed requests `input_ids` [T] split by `cu_seqlens` [R+1], each block's tokens
        chosen by `keep` (default: `Dense`).

        prompt_lens [R]: tokens past it are continuation (decode rule); default all prompt.
        logits_at: token indices whose logits to compute (the LM head over a 49k vocabulary
        costs as much as several blocks); default all.
        """
        keep = Dense() if keep is None else keep
        tok = Tokens.of(cu_seqlens, prompt_lens)
        bounds = cu_seqlens.tolist()
        T = len(input_ids)

        h = self.hf.model.embed_tokens(input_ids)
        cos, sin = (t[0] for t in self.hf.model.rotary_emb(h[None], tok.positions[None]))
        hidden, keeps, logits_all, probs, routed = [], [], [], [], []
        for b in range(self.num_blocks):
            hidden.append(h)
            q, k, v = self.qkv(b, h)
            decision = keep.decide(b, k, tok)
            h_full = self._block_output(b, h, q, k, v, cos, sin, bounds)
            decision = keep.revise(b, h, h_full, tok, decision)
            if decision.gate is None:
                h, hard = h_full, torch.ones(T, dtype=torch.bool, device=h.device)
            else:
                g = decision.gate.to(h.dtype)[:, None]
                h, hard = h_full * g + h * (1 - g), decision.gate.detach() > 0.5
            if decision.router_logits is not None:
                routed.append(b)
            keeps.append(hard)
            logits_all.append(h.new_zeros(T) if decision.router_logits is None else decision.router_logits)
            probs.append(hard.float() if decision.keep_prob is None else decision.keep_prob)
        hidden.append(h)
        logits = self.hf.lm_head(self.hf.model.norm(h if logits_at is None else h[logits_at]))
        hidden = hidden if return_hidden else None
        return RoutedOutput(logits, torch.stack(keeps), torch.stack(logits_all), torch.stack(probs), routed, hidden)


# ---- calibration -------------------------------------------------------------------

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


def calibrate_block_thresholds(router: R.Router, block: int, logits: Tensor, tok: Tokens) -> None:
    """Set `block`'s prompt threshold (for the pass's prompt length when the router has
    short-prompt thresholds) and decode threshold so that its router `logits` [T] skip exactly
    the block's targets of this pass's prompt and continuation tokens."""
    p, d = tok.is_prompt, ~tok.is_prompt
    forced = router.always_keep(tok.positions, tok.prompt_lens)
    if p.any():
        lengths = tok.prompt_lens[p].unique().tolist()
        if router.short_lengths and len(lengths) > 1:
            raise ValueError(f"calibrate one prompt length at a time for a router with short-prompt "
                             f"thresholds (got {lengths})")
        value = R.calibrate_threshold(logits[p], router.sparsity[block].item(), forced[p])
        router.set_prompt_threshold(block, max(lengths), value)
    if d.any():
        router.threshold_decode[block] = R.calibrate_threshold(logits[d], router.decode_sparsity[block].item(),
                                                               forced[d])


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
    return model(input_ids, cu_seqlens, prompt_lens, keep=Calibrating(router), logits_at=logits_at)


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
