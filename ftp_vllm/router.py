"""The FTP token router: features, the shared MLP, keep rules, calibration.

The one place the router math lives; the plain-PyTorch reference
(`ftp_vllm.reference`) and the vLLM decoder layers both call it.  Every
function works on flat token tensors ``[num_tokens, ...]`` (no batch dim), with
request boundaries given as ``cu_seqlens`` (vLLM's ``query_start_loc``:
request r owns tokens ``cu_seqlens[r]:cu_seqlens[r+1]``) and each token's
absolute position in its request.

Definitions, per token i of a request and per decoder block b.  They look only
backwards (at tokens j <= i of the same request), so a token's decision does
not depend on later tokens, on how a prompt is split into scheduler steps
(chunked prefill, prefix-cache hits, one-token decode steps), or on which
other requests share the batch.

score_i   Attention score, the pre-softmax logit token i's key receives from
          the block's calibrated mean query:
              score_i = (1/H) sum_h <qbar_{b,h}, k_{i,kv(h)}> / sqrt(head_dim)
          k is the block's key projection (bias included, as in Qwen2) of the
          input-normed hidden state, BEFORE rotary; qbar_{b,h} is the mean
          pre-rotary query of head h over calibration tokens.  Folding each
          KV group's query heads, ``mean_query[b, g] = (1/H) sum_{h in g}
          qbar_{b,h}``, makes it one dot product per KV head.  Every token,
          kept or skipped, computes its key at every block anyway, so the
          score costs almost nothing and needs no attention matrix.
          vLLM: the paged cache holds post-rotary keys k'_j = R(p_j) k_j and
          rotations preserve dot products, <R(p_j) qbar, k'_j> = <qbar, k_j>,
          so earlier tokens' scores can be recomputed from the cache by
          rotating qbar to each cached position (or kept in a per-block score
          buffer beside the cache, as the vLLM layers do: a token's score is
          then computed once, so it is the same whether the token is in the
          step or in the past).  The score is linear in the normed hidden
          state x_i: score_i = <W_k^T qbar, x_i> / sqrt(d) + const; the vLLM
          layers compute it that way (`hidden_scores`), per row in float32,
          so that no reduced-precision key GEMM, whose rounding depends on
          the batch, moves a decision.
rank_i    Relative score: the fraction of the request's tokens j <= i (i
          itself included) with score_j <= score_i.  In (0, 1]; the first
          token's rank is 1.
pos_i     Position relative to the prompt: p_i / (L - 1) for a prompt of L
          tokens, 0 at the first token and 1 at the last; decode tokens
          (p_i >= L) get 1, they are the most recent.  Recency relative to
          the prompt's end is what the static router keeps by; an absolute
          position cannot express it.  L is known from a request's first
          step on, so the feature is as split-independent as the others.
sparsity  The block's target (prompt) sparsity s_b in [0, 1]; decode tokens
          get the same input, only their threshold differs.

Router input: the raw features ``[pos, score, rank, sparsity]``, standardised
as (x - feature_mean[b]) / feature_std[b] with statistics of calibration text
(per block, since score scales differ across blocks while one MLP serves them
all; the sparsity column is left raw: mean 0, std 1).  `RouterMLP`, shared by
all blocks, maps it to a logit.

Keep rule (`keep_mask`): a prompt token is kept where logit >
threshold_prompt[b], a decode token where logit > threshold_decode[b]; both
thresholds live in logit space (p > t on the probability is logit > logit(t);
the paper's p > 0.5 is a threshold of 0) and are calibrated per block so the
realised sparsity on calibration text equals the target (`calibrate_threshold`).
threshold_prompt[b] is calibrated on prompts of `threshold_length` tokens (the
training context); a prompt of L < threshold_length tokens uses the threshold
calibrated on prompts of the largest of `short_lengths` <= L (`threshold_short`,
where a router has them), because one threshold fitted on long prompts skips
measurably less than the target on short ones.  L is known from a request's
first step, so this is split-independent too.
Position 0 and the prompt's last token (it produces the first output) are
always kept, and so is every token of a prompt shorter than the router's
`min_prompt` (64 by default, recorded in the checkpoint): routing one saves
little, and in a short prompt most tokens carry the request (a 37-token chat
question routed at 30%, by the trained or the static router, lost its
answer).  Prompt lengths are known from a request's first step, so this too is
split-independent.  A block whose prompt and decode targets are both 0 keeps
every token and runs no router at all (`Router.is_dense`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_FEATURES = 4
HIDDEN = 64
MIN_ROUTED_PROMPT = 64


# ---- request layout -------------------------------------------------------

def request_ids(cu_seqlens: Tensor) -> Tensor:
    """Index of the request each flat token belongs to."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def local_index(cu_seqlens: Tensor) -> Tensor:
    """Each token's offset within its request's slice."""
    ids = request_ids(cu_seqlens)
    return torch.arange(len(ids), device=cu_seqlens.device) - cu_seqlens[ids]


def always_keep_mask(positions: Tensor, prompt_lens: Tensor) -> Tensor:
    """Position 0 and each prompt's last token; `prompt_lens` is per token."""
    return (positions == 0) | (positions == prompt_lens - 1)


# ---- features -------------------------------------------------------------

def fold_mean_query(mean_query: Tensor, num_kv_heads: int) -> Tensor:
    """[..., H, d] per-head mean queries -> [..., KV, d], scaled by 1/H (GQA groups are contiguous)."""
    *lead, heads, dim = mean_query.shape
    return mean_query.reshape(*lead, num_kv_heads, heads // num_kv_heads, dim).sum(-2) / heads


def fold_key_projection(mean_query: Tensor, key_weight: Tensor, key_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(w [hidden], c): the score as a linear function of the input-normed hidden state x,
    score = <w, x> + c, with w = W_k^T qbar / sqrt(d) and c = <qbar, b_k> / sqrt(d), from the
    folded mean query [KV, d] and the key projection's rows [KV * d, hidden] (and bias)."""
    scale = math.sqrt(mean_query.shape[-1])
    query = mean_query.reshape(-1).double()
    weight = query @ key_weight.double() / scale
    bias = query @ key_bias.double() / scale if key_bias is not None else query.new_zeros(())
    return weight.float(), bias.float()


def hidden_scores(hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """score per token from input-normed hidden states [T, hidden] and a folded key projection
    (`fold_key_projection`), in float32 and per row: equal to `key_scores` up to float
    rounding, but with no reduced-precision GEMM whose kernel, and so rounding, depends on
    how many tokens share the step.  Serving engines use it; a token's decision near its
    threshold must not flip with its batch neighbours."""
    return (hidden.float() * weight).sum(-1) + bias


def key_scores(keys: Tensor, mean_query: Tensor) -> Tensor:
    """score per token from keys [T, KV, d] and folded mean query [KV, d] (or [T, KV, d] rotated
    to each token's position when `keys` are post-rotary cache entries)."""
    keys = keys.float()
    return (keys * mean_query.float()).sum((-1, -2)) / math.sqrt(keys.shape[-1])


class RankLayout:
    """Where each request's earlier (past) and current (step) tokens sit, for `causal_rank`.

    Depends only on the step's shape, so one layout serves every block of a forward.  Few
    requests (prefill): each request's step tokens are compared with its own context, a
    lower-triangular block.  Many requests (decode): one padded table, gathered per token."""

    LOOP_MAX_REQUESTS = 16

    def __init__(self, cu_seqlens: Tensor, past_cu_seqlens: Tensor | None = None):
        if past_cu_seqlens is None:
            past_cu_seqlens = torch.zeros_like(cu_seqlens)
        self.n_past = past_cu_seqlens[1:] - past_cu_seqlens[:-1]
        n_step = cu_seqlens[1:] - cu_seqlens[:-1]
        self.num_requests = len(n_step)
        self.rid, self.off = request_ids(cu_seqlens), local_index(cu_seqlens)
        self.denominator = (self.n_past[self.rid] + self.off + 1).float()
        self.loop = self.num_requests <= self.LOOP_MAX_REQUESTS
        if self.loop:
            cu, past_cu = cu_seqlens.tolist(), past_cu_seqlens.tolist()
            self.bounds = [(cu[r], cu[r + 1], past_cu[r], past_cu[r + 1]) for r in range(self.num_requests)]
            return
        self.max_past = int(self.n_past.max()) if self.num_requests else 0
        max_step = int(n_step.max()) if self.num_requests else 0
        self.past_rid, self.past_off = request_ids(past_cu_seqlens), local_index(past_cu_seqlens)
        self.width = self.max_past + max_step
        col = torch.arange(self.width, device=cu_seqlens.device)
        self.chunks = []
        for start in range(0, len(self.rid), 1024):  # bounds memory for long prompts
            sl = slice(start, start + 1024)
            self.chunks.append((sl, (col < self.max_past) | (col - self.max_past <= self.off[sl, None])))

    def rank(self, scores: Tensor, past_scores: Tensor | None = None) -> Tensor:
        counts = scores.new_empty(len(scores), dtype=torch.float32)
        if self.loop:
            for a, b, pa, pb in self.bounds:
                step = scores[a:b]
                context = step if pa == pb else torch.cat([past_scores[pa:pb], step])
                counts[a:b] = torch.le(context[None, :], step[:, None]).tril_(pb - pa).sum(-1, dtype=torch.int32)
            return counts / self.denominator
        # each request's past then step, padded with NaN, which compares False
        table = scores.new_full((self.num_requests, self.width), float("nan"))
        if past_scores is not None and len(past_scores):
            table[self.past_rid, self.past_off] = past_scores
        table[self.rid, self.max_past + self.off] = scores
        for sl, visible in self.chunks:
            counts[sl] = torch.le(table[self.rid[sl]], scores[sl, None]).logical_and_(visible).sum(-1, dtype=torch.int32)
        return counts / self.denominator


def causal_rank(
    scores: Tensor,
    cu_seqlens: Tensor,
    past_scores: Tensor | None = None,
    past_cu_seqlens: Tensor | None = None,
    layout: RankLayout | None = None,
) -> Tensor:
    """rank_i of every step token: the share of its request's tokens up to and including it
    whose score is <= its own.  The past (earlier tokens of each request, e.g. from the KV
    cache) is given as `past_scores` split by `past_cu_seqlens`.  Without a past the step is
    taken to be whole requests.  Split-independent: any split of a request into a past and a
    step gives the same ranks as the whole sequence."""
    layout = layout or RankLayout(cu_seqlens, past_cu_seqlens)
    return layout.rank(scores, past_scores)


def position_feature(positions: Tensor, prompt_lens: Tensor) -> Tensor:
    """pos_i from absolute positions and each token's prompt length."""
    return (positions.float() / (prompt_lens - 1).clamp_min(1).float()).clamp_max(1.0)


def router_features(
    scores: Tensor, rank: Tensor, positions: Tensor, prompt_lens: Tensor, sparsity: float | Tensor
) -> Tensor:
    """[T, 4] raw router features: [pos, attention score, rank, block sparsity]."""
    pos = position_feature(positions, prompt_lens)
    s = torch.as_tensor(sparsity, dtype=torch.float32, device=pos.device).expand_as(pos)
    return torch.stack([pos, scores.float(), rank.float(), s], dim=-1)


# ---- router ---------------------------------------------------------------

class RouterMLP(nn.Module):
    """Linear(4, 64) -> SiLU -> Linear(64, 1): one logit per token, shared by all blocks.

    Computed as per-row products and sums, not matmuls: BLAS picks kernels (and so the
    rounding) by the number of rows, and a token's decision near its threshold must not
    depend on how many other tokens share the step.  At this size it costs nothing.
    """

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        hidden = self.fc1.bias
        for j in range(NUM_FEATURES):  # one feature at a time: no [T, 64, 4] temporary
            hidden = hidden + features[..., j, None] * self.fc1.weight[:, j]
        return (F.silu(hidden) * self.fc2.weight[0]).sum(-1) + self.fc2.bias[0]


class Router(nn.Module):
    """The MLP plus the per-block state it needs; buffers are the checkpoint's tensors.

    mean_query [B, KV, d] folded mean queries; feature_mean/feature_std [B, 4]
    feature standardisation; sparsity / decode_sparsity [B] targets; threshold_prompt /
    threshold_decode [B] logit thresholds (0 until calibrated: p > 0.5).
    """

    def __init__(self, num_blocks: int, num_kv_heads: int, head_dim: int, hidden: int = HIDDEN,
                 min_prompt: int = MIN_ROUTED_PROMPT, short_lengths: Sequence[int] = (),
                 threshold_length: int = 0):
        super().__init__()
        self.mlp = RouterMLP(hidden)
        self.min_prompt = min_prompt
        self.short_lengths = [int(n) for n in short_lengths]
        self.threshold_length = int(threshold_length)
        if self.short_lengths and (sorted(set(self.short_lengths)) != self.short_lengths
                                   or self.short_lengths[-1] >= self.threshold_length):
            raise ValueError(f"short prompt lengths {self.short_lengths} must rise and stay below the threshold "
                             f"length {self.threshold_length}")
        self.register_buffer("mean_query", torch.zeros(num_blocks, num_kv_heads, head_dim))
        self.register_buffer("feature_mean", torch.zeros(num_blocks, NUM_FEATURES))
        self.register_buffer("feature_std", torch.ones(num_blocks, NUM_FEATURES))
        self.register_buffer("sparsity", torch.zeros(num_blocks))
        self.register_buffer("decode_sparsity", torch.zeros(num_blocks))
        self.register_buffer("threshold_prompt", torch.zeros(num_blocks))
        self.register_buffer("threshold_decode", torch.zeros(num_blocks))
        self.register_buffer("threshold_short", torch.zeros(num_blocks, len(self.short_lengths)))
        self.register_buffer("short_bounds", torch.tensor(self.short_lengths, dtype=torch.long), persistent=False)
        self._targets = [(0.0, 0.0)] * num_blocks  # host copy of the targets: no device sync per step

    @property
    def num_blocks(self) -> int:
        return len(self._targets)

    def set_schedule(self, sparsity: Sequence[float], decode_sparsity: Sequence[float] | None = None) -> None:
        """Set per-block targets; decode defaults to the prompt schedule."""
        decode_sparsity = sparsity if decode_sparsity is None else decode_sparsity
        self.sparsity.copy_(torch.as_tensor(list(sparsity), dtype=torch.float32))
        self.decode_sparsity.copy_(torch.as_tensor(list(decode_sparsity), dtype=torch.float32))
        self._sync_targets()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_targets()

    def _sync_targets(self) -> None:
        self._targets = list(zip(self.sparsity.tolist(), self.decode_sparsity.tolist()))

    def targets(self, block: int) -> tuple[float, float]:
        """(prompt, decode) target sparsity of `block`, from the host copy."""
        return self._targets[block]

    def is_dense(self, block: int) -> bool:
        """True when block keeps every token: callers then skip the router (no host sync)."""
        return self._targets[block] == (0.0, 0.0)

    def block_scores(self, block: int, keys: Tensor) -> Tensor:
        """score of step tokens from their pre-rotary keys [T, KV, d]."""
        return key_scores(keys, self.mean_query[block])

    def fold(self, block: int, key_weight: Tensor, key_bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """`fold_key_projection` of `block` with the model's key projection rows."""
        return fold_key_projection(self.mean_query[block], key_weight, key_bias)

    def block_features(
        self,
        block: int,
        scores: Tensor,
        positions: Tensor,
        prompt_lens: Tensor,
        cu_seqlens: Tensor,
        past_scores: Tensor | None = None,
        past_cu_seqlens: Tensor | None = None,
        layout: RankLayout | None = None,
        sparsity: Tensor | None = None,
    ) -> Tensor:
        """Raw features [T, 4] of the step tokens at `block`; `prompt_lens` is per token, and so is
        `sparsity` where given (tokens of several operating points, `ftp_vllm.ladder`)."""
        rank = causal_rank(scores, cu_seqlens, past_scores, past_cu_seqlens, layout)
        return router_features(scores, rank, positions, prompt_lens, self.sparsity[block] if sparsity is None else sparsity)

    def block_logits(
        self,
        block: int,
        scores: Tensor,
        positions: Tensor,
        prompt_lens: Tensor,
        cu_seqlens: Tensor,
        past_scores: Tensor | None = None,
        past_cu_seqlens: Tensor | None = None,
        layout: RankLayout | None = None,
        sparsity: Tensor | None = None,
    ) -> Tensor:
        """Router logits [T] of the step tokens at `block`, given their scores (and the past's)."""
        raw = self.block_features(block, scores, positions, prompt_lens, cu_seqlens, past_scores, past_cu_seqlens,
                                  layout, sparsity)
        return self.mlp((raw - self.feature_mean[block]) / self.feature_std[block])

    def always_keep(self, positions: Tensor, prompt_lens: Tensor) -> Tensor:
        """Tokens no threshold can skip: position 0, each prompt's last token, and every token
        of a prompt shorter than `min_prompt`."""
        short = ~self.routes_prompt(prompt_lens) & (positions < prompt_lens)
        return always_keep_mask(positions, prompt_lens) | short

    def routes_prompt(self, prompt_lens: Tensor) -> Tensor:
        """Whether a prompt of each length is routed: `min_prompt` tokens or more (shorter ones
        run dense; the checkpoint's prompt targets are about the rest)."""
        return prompt_lens >= self.min_prompt

    def prompt_threshold(self, block: int, prompt_lens: Tensor) -> Tensor:
        """Prompt threshold per token: the one calibrated for its prompt's length band (the
        largest short length <= L), or `threshold_prompt` for L >= threshold_length and below
        every short length (such prompts are shorter than min_prompt and kept whole).  A short
        prompt's always-kept tokens weigh more and its features spread differently, so one
        threshold would skip less than the target there."""
        if not self.short_lengths:
            return self.threshold_prompt[block]
        col = torch.bucketize(prompt_lens, self.short_bounds.to(prompt_lens.dtype), right=True) - 1
        short = (col >= 0) & (prompt_lens < self.threshold_length)
        return torch.where(short, self.threshold_short[block][col.clamp_min(0)], self.threshold_prompt[block])

    def set_prompt_threshold(self, block: int, prompt_len: int, value: float) -> None:
        """Store a prompt threshold calibrated on prompts of `prompt_len` tokens: in its short
        column when there is one for exactly that length, else as `threshold_prompt`."""
        if prompt_len in self.short_lengths:
            self.threshold_short[block, self.short_lengths.index(prompt_len)] = value
        elif prompt_len >= self.threshold_length:
            self.threshold_prompt[block] = value
        else:
            raise ValueError(f"no threshold for {prompt_len}-token prompts: short lengths {self.short_lengths}, "
                             f"threshold length {self.threshold_length}")

    def keep_every_token(self) -> None:
        """Thresholds that no logit is below, the short-prompt ones included: the router still
        decides at every block of its schedule but keeps every token (the cost of routing alone)."""
        for threshold in (self.threshold_prompt, self.threshold_short, self.threshold_decode):
            threshold.fill_(float("-inf"))

    def keep(self, block: int, logits: Tensor, positions: Tensor, prompt_lens: Tensor) -> Tensor:
        """Serving keep rule at `block`; `prompt_lens` is per token.  A kind of token (prompt or
        decode) whose target is 0 is always kept, calibrated or not."""
        prompt_target, decode_target = self._targets[block]
        inf = torch.tensor(float("-inf"), device=logits.device)
        return keep_mask(
            logits,
            positions < prompt_lens,
            self.always_keep(positions, prompt_lens),
            self.prompt_threshold(block, prompt_lens) if prompt_target else inf,
            self.threshold_decode[block] if decode_target else inf,
        )


# ---- keep rules -----------------------------------------------------------

def keep_mask(
    logits: Tensor,
    is_prompt: Tensor,
    always_keep: Tensor,
    threshold_prompt: Tensor | float,
    threshold_decode: Tensor | float,
) -> Tensor:
    """Serving keep rule on flat tokens: logit above its kind's threshold, or always kept."""
    threshold = torch.where(is_prompt, torch.as_tensor(threshold_prompt), torch.as_tensor(threshold_decode))
    return (logits > threshold) | always_keep


def soft_gate(logits: Tensor, always_keep: Tensor, threshold: float | Tensor = 0.0, temperature: float = 1.0):
    """Training gate: (straight-through gate, keep probability).  The gate's forward value is
    the hard keep decision, its gradient that of sigmoid((logit - threshold) / temperature)."""
    prob = torch.sigmoid((logits - threshold) / temperature)
    prob = torch.where(always_keep, torch.ones_like(prob), prob)
    hard = ((logits > threshold) | always_keep).to(prob.dtype)
    return hard + prob - prob.detach(), prob


def topk_keep(logits: Tensor, cu_seqlens: Tensor, sparsity: float, always_keep: Tensor) -> Tensor:
    """Keep the top k = ceil((1 - s) n) tokens of each request by logit, always-kept ones first
    (reference mode: looks at the whole sequence, so not for chunked serving)."""
    keep = torch.zeros_like(always_keep)
    ranked = torch.where(always_keep, torch.full_like(logits, float("inf")), logits)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        k = max(keep_count(end - start, sparsity), int(always_keep[start:end].sum()))
        keep[start + ranked[start:end].topk(k).indices] = True
    return keep


def keep_count(n: int, sparsity: float) -> int:
    """k = ceil((1 - s) n), at least 1; tolerant of float error such as (1 - 0.3) * 10 > 7."""
    return max(1, min(n, math.ceil((1 - sparsity) * n - 1e-6)))


def static_router_keep(seq_len: int, sparsity: float) -> Tensor:
    """Static router: keep token 0, then the most recent tokens going backwards, k in all."""
    keep = torch.zeros(seq_len, dtype=torch.bool)
    k = keep_count(seq_len, sparsity)
    keep[0] = True
    if k > 1:
        keep[seq_len - (k - 1):] = True
    return keep


# ---- calibration ----------------------------------------------------------

def calibrate_threshold(logits: Tensor, sparsity: float, always_keep: Tensor | None = None) -> float:
    """Logit threshold at which round(s * n) of the n tokens are skipped (forced keeps count as
    kept, so at most the free tokens are skipped).  Midway between neighbours, so float noise
    on the same text does not flip a decision; -inf keeps all, +inf skips every free token."""
    free = logits if always_keep is None else logits[~always_keep]
    m = min(round(sparsity * len(logits)), len(free))
    if m == 0:
        return float("-inf")
    if m == len(free):
        return float("inf")
    ordered = free.detach().float().sort().values
    return float((ordered[m - 1] + ordered[m]) / 2)


def calibrate_thresholds(
    logits: Sequence[Tensor], sparsity: Sequence[float], always_keep: Sequence[Tensor] | None = None
) -> Tensor:
    """Per-block thresholds [B] from the router logits each block produced on calibration text."""
    forced = always_keep or [None] * len(logits)
    return torch.tensor([calibrate_threshold(l, s, a) for l, s, a in zip(logits, sparsity, forced)])
