"""Quality of a pruned model as a served request sees it, on held-out text.

Two measurements, both with serving semantics (`ftp_vllm.reference`: a context
routed as a prompt, then tokens scored one by one under the decode rule; text
packed as a `ContinuationBatch`):

- continuation: chunks of `context + continuation` tokens; the continuation's
  perplexity, top-1 agreement and KL to the dense model.  Full-sequence
  perplexity (every position of the same pass) is reported beside it, labelled
  as misleading: a skipped prompt token's own prediction is never served.
- next-sentence cloze: a context from a document, its true next sentence and
  three next sentences from other documents, each scored by its summed
  log-likelihood; accuracy with a Wilson 95% interval.

A method (dense, a router, a baseline keep rule) is a `Method`; its realised
sparsity is counted from the keep masks of every token it ran.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .baselines import KeepRule
from .reference import Dense, GivenMasks, KeepPolicy, RoutedModel, Served, is_prompt, rotate
from .router import Router, local_index, request_ids

CHOICES = 4
CHANCE = 1 / CHOICES


# ---- methods ---------------------------------------------------------------------

@dataclass
class Method:
    """One configuration: `router` decides (serving rule), or `keep_rule` gives the masks
    (`baselines`), or neither (dense).  `info` goes into the results as it is."""

    method: str  # dense | ftp | static | shortgpt | shortgpt-prompt | static-uniform | random
    router_name: str | None = None
    router: Router | None = None
    keep_rule: KeepRule | None = None
    info: dict = field(default_factory=dict)
    min_prompt: int = 0  # a keep rule's shortest routed prompt (a router's own `min_prompt` wins)

    def policy(self, cu_seqlens: Tensor, prompt_lens: Tensor) -> KeepPolicy:
        """How the reference chooses this method's tokens on a batch."""
        if self.router is not None:
            return Served(self.router)
        if self.keep_rule is not None:
            return GivenMasks(self.keep_rule(cu_seqlens, prompt_lens))
        return Dense()

    def routed_prompt(self, cu_seqlens: Tensor, prompt_lens: Tensor) -> Tensor:
        """[T] bool: prompt tokens of the prompts this method routes: `min_prompt` tokens or
        more (`Router.routes_prompt`)."""
        routed = self.router.routes_prompt(prompt_lens) if self.router is not None else prompt_lens >= self.min_prompt
        return is_prompt(cu_seqlens, prompt_lens) & routed[request_ids(cu_seqlens)]


# ---- realised sparsity -------------------------------------------------------------

KINDS = ("prompt", "decode")
ROUTED = "routed prompt"  # a subset of "prompt": tokens of prompts the method routes


@dataclass
class SkipCounter:
    """Token-block computations skipped and run, per block, for prompt and decode tokens (and,
    when `add` is told, for the prompt tokens of routed prompts apart)."""

    per_block: dict = field(default_factory=dict)  # kind -> [B] tokens each block skipped
    tokens: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))  # kind -> tokens run

    @classmethod
    def of(cls, keep: Tensor, prompt: Tensor) -> SkipCounter:
        counter = cls()
        counter.add(keep, prompt)
        return counter

    def add(self, keep: Tensor, prompt: Tensor, routed: Tensor | None = None) -> None:
        """keep [B, T] bool; prompt [T] bool; routed [T] bool, the prompt tokens of routed prompts."""
        kinds, masks = KINDS, (prompt, ~prompt)
        if routed is not None:
            kinds, masks = kinds + (ROUTED,), masks + (routed,)
        for kind, mask in zip(kinds, masks):
            self.tokens.setdefault(kind, 0)
            skipped = (~keep[:, mask]).sum(-1).tolist()
            self.tokens[kind] += int(mask.sum())
            self.per_block[kind] = [a + b for a, b in zip(self.per_block.get(kind, [0] * len(skipped)), skipped)]

    def __add__(self, other: SkipCounter) -> SkipCounter:
        total = SkipCounter()
        for counter in (self, other):
            for kind in counter.tokens:
                total.tokens[kind] = total.tokens.get(kind, 0) + counter.tokens[kind]
                if kind in counter.per_block:
                    mine = total.per_block.get(kind, [0] * len(counter.per_block[kind]))
                    total.per_block[kind] = [a + b for a, b in zip(mine, counter.per_block[kind])]
        return total

    @property
    def skipped(self) -> dict:
        return {kind: sum(self.per_block.get(kind, [])) for kind in self.tokens}

    @property
    def total(self) -> dict:
        """Token-block computations run per kind: every block sees every token."""
        return {kind: len(self.per_block.get(kind, [])) * self.tokens[kind] for kind in self.tokens}

    def share(self, kind: str | None = None) -> float | None:
        """Share skipped of `kind`'s token-block computations; None: of all of them."""
        kinds = KINDS if kind is None else (kind,)
        skipped, total = self.skipped, self.total
        run = sum(total[k] for k in kinds)
        return sum(skipped[k] for k in kinds) / run if run else None

    def report(self) -> dict:
        """Per-block and mean skipped shares, prompt and decode apart (what a checkpoint records)."""
        out = {}
        for kind in KINDS:
            n = self.tokens[kind]
            per_block = [round(s / n, 4) for s in self.per_block.get(kind, [])] if n else []
            out[kind] = {"per_block": per_block, "mean": round(self.share(kind), 4) if n else None}
        return out


# ---- continuation ----------------------------------------------------------------

@dataclass
class ContinuationBatch:
    """Chunks packed as requests: prompt = first `context` tokens, the rest a continuation."""

    input_ids: Tensor
    cu_seqlens: Tensor
    prompt_lens: Tensor
    scored: Tensor  # token indices whose logits predict a continuation token
    targets: Tensor  # the continuation tokens they predict

    @classmethod
    def of(cls, chunks: Tensor, context: int) -> ContinuationBatch:
        n, length = chunks.shape
        starts = torch.arange(n) * length
        offsets = torch.arange(context - 1, length - 1)
        scored = (starts[:, None] + offsets).reshape(-1)
        ids = chunks.reshape(-1)
        return cls(ids, starts.new_tensor([*starts.tolist(), n * length]), torch.full((n,), context), scored, ids[scored + 1])

    def prompts(self) -> Tensor:
        """The prompt parts [N, context] of the chunks."""
        return self.input_ids.view(len(self.prompt_lens), -1)[:, : int(self.prompt_lens[0])]

    def short_windows(self, context: int) -> ContinuationBatch:
        """The chunks cut into windows of a `context`-token prompt and the same continuation:
        how the shortest routed prompts fare, where an always-kept token weighs most and a
        skipped one leaves a later token less to attend to."""
        chunks = self.input_ids.view(len(self.prompt_lens), -1)
        length = context + chunks.shape[1] - int(self.prompt_lens[0])
        if not 0 < context < length <= chunks.shape[1]:
            raise ValueError(f"no {context}-token prompt and continuation fit in {chunks.shape[1]}-token chunks")
        return ContinuationBatch.of(chunks[:, : chunks.shape[1] // length * length].reshape(-1, length), context)


@torch.no_grad()
def continuation_logprobs(model: RoutedModel, batch: ContinuationBatch, keep: KeepPolicy | None = None) -> Tensor:
    """Log-probabilities [N, V] at the scored tokens, the tokens chosen by `keep` (default dense)."""
    out = model(batch.input_ids, batch.cu_seqlens, batch.prompt_lens, keep=keep, logits_at=batch.scored)
    return F.log_softmax(out.logits.float(), -1)


def kl_and_nll(logprobs: Tensor, dense_logprobs: Tensor, targets: Tensor) -> tuple[float, float]:
    """(mean KL(dense || pruned), mean NLL of the true continuation) over scored tokens."""
    kl = (dense_logprobs.exp() * (dense_logprobs - logprobs)).sum(-1).mean()
    nll = -logprobs.gather(-1, targets[:, None]).mean()
    return float(kl), float(nll)


@dataclass
class ContinuationSums:
    scored: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    full_tokens: int = 0
    full_nll: float = 0.0

    def metrics(self) -> dict:
        return {"ppl": math.exp(self.nll / self.scored), "kl": self.kl / self.scored,
                "top1_agreement": self.agree / self.scored, "full_seq_ppl": math.exp(self.full_nll / self.full_tokens)}


@torch.inference_mode()
def continuation_pass(model: RoutedModel, method: Method, chunks: Tensor, context: int, dense: Tensor | None,
                      counter: SkipCounter, sums: ContinuationSums) -> Tensor:
    """Run `chunks` [N, L] (first `context` tokens a routed prompt); add to `sums` and
    `counter`; return the continuation log-probs (the dense reference when `dense` is None)."""
    batch = ContinuationBatch.of(chunks, context)
    out = model(batch.input_ids, batch.cu_seqlens, batch.prompt_lens,
                keep=method.policy(batch.cu_seqlens, batch.prompt_lens))
    logprobs = F.log_softmax(out.logits.float(), -1)
    counter.add(out.keep, is_prompt(batch.cu_seqlens, batch.prompt_lens),
                method.routed_prompt(batch.cu_seqlens, batch.prompt_lens))
    cont = logprobs[batch.scored]
    reference = cont if dense is None else dense
    kl, nll = kl_and_nll(cont, reference, batch.targets)
    n = len(batch.targets)
    sums.scored += n
    sums.nll += nll * n
    sums.kl += kl * n
    sums.agree += float((cont.argmax(-1) == reference.argmax(-1)).sum())
    not_last = local_index(batch.cu_seqlens) < chunks.shape[1] - 1
    full = logprobs[not_last].gather(-1, batch.input_ids.roll(-1)[not_last][:, None])
    sums.full_tokens += len(full)
    sums.full_nll -= float(full.sum())
    return cont


# ---- cloze ---------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`*])")
_RULE = re.compile(r"^\s*([*=#~^-])\1{2,}\s*$")


def sentences(document: str) -> list[str]:
    """Prose sentences of a document, in order: paragraphs split on blank lines, indented
    (code) paragraphs and headings (a line underlined by *** / === / ---) dropped."""
    out = []
    for para in re.split(r"\n\s*\n", document):
        lines = para.strip("\n").splitlines()
        if not lines or lines[0][:1].isspace() or any(_RULE.match(l) for l in lines):
            continue
        out += [s for s in _SENTENCE_END.split(" ".join(" ".join(lines).split())) if s]
    return out


@dataclass
class ClozeItem:
    context: list[int]  # token ids: the end of the sentences before the true one
    candidates: list[list[int]]  # CHOICES continuations; candidates[answer] is the true next sentence
    answer: int
    document: int
    distractor_documents: list[int]


def cloze_items(tokenizer, documents: Sequence[str], n: int, seed: int = 0, context_tokens: int = 32,
                candidate_tokens: int = 12, min_candidate_tokens: int = 3) -> list[ClozeItem]:
    """Up to `n` items, deterministic per seed.  Each takes a sentence with at least one
    sentence before it in its document: the context is the last `context_tokens` tokens of
    the sentences before it, the candidates the first `candidate_tokens` tokens of it and of
    three sentences (never first in their document, never equal to the true candidate) from
    three other, distinct documents; the true one's place among them is random."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    docs = [sentences(d) for d in documents]
    cand = [[encode(" " + s)[:candidate_tokens] for s in doc] for doc in docs]
    usable = [[i for i in range(1, len(doc)) if len(cand[d][i]) >= min_candidate_tokens] for d, doc in enumerate(docs)]
    pairs = [(d, i) for d, idx in enumerate(usable) for i in idx]
    donors = [d for d, idx in enumerate(usable) if idx]
    if len(donors) < CHOICES:
        raise ValueError(f"the text has {len(donors)} documents with usable sentences; the cloze needs {CHOICES}")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items = []
    for d, i in pairs:
        if len(items) == n:
            break
        true = cand[d][i]
        others = rng.sample([x for x in donors if x != d], CHOICES - 1)
        pools = [[cand[o][j] for j in usable[o] if cand[o][j] != true] for o in others]
        if not all(pools):  # a distractor identical to the true candidate would make a tie
            continue
        candidates = [rng.choice(pool) for pool in pools]
        answer = rng.randrange(CHOICES)
        candidates.insert(answer, true)
        context = encode(" ".join(docs[d][:i]))[-context_tokens:]
        items.append(ClozeItem(context, candidates, answer, d, others))
    return items


def _pack(seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()])
    return ids, cu


@torch.inference_mode()
def cloze_scores(model: RoutedModel, method: Method, items: Sequence[ClozeItem], counter: SkipCounter) -> Tensor:
    """[len(items), CHOICES] summed log-likelihood of each candidate given its context."""
    ctx_ids, ctx_cu = _pack([it.context for it in items])
    br_ids, br_cu = _pack([c for it in items for c in it.candidates])
    br_ctx = torch.arange(len(items)).repeat_interleave(CHOICES)
    return branch_logprobs(model, method, ctx_ids, ctx_cu, br_ids, br_cu, br_ctx, counter).view(-1, CHOICES)


def branch_logprobs(model: RoutedModel, method: Method, ctx_ids: Tensor, ctx_cu: Tensor, br_ids: Tensor,
                    br_cu: Tensor, br_ctx: Tensor, counter: SkipCounter | None = None) -> Tensor:
    """Summed log-probability of each branch `br_ids[br_cu[n]:br_cu[n+1]]` as the continuation
    of context `br_ctx[n]`: the same as one pass over context + branch with the context as the
    prompt (decode rule on the branch), but each context runs once for all its branches.

    The contexts run through `RoutedModel` as whole prompts; the branches then run block by
    block attending to their context's keys and values, recomputed from the block inputs the
    context pass returned (a skipped token's K/V come from its unchanged state, as served)."""
    ctx_len = ctx_cu[1:] - ctx_cu[:-1]
    out = model(ctx_ids, ctx_cu, keep=method.policy(ctx_cu, ctx_len), return_hidden=True, logits_at=ctx_cu[1:] - 1)
    first = F.log_softmax(out.logits.float(), -1)  # [C, V]: predicts each branch's first token
    T, N = len(br_ids), len(br_cu) - 1
    rid, off = request_ids(br_cu), local_index(br_cu)
    br_len, prompt_lens = br_cu[1:] - br_cu[:-1], ctx_len[br_ctx]
    positions, token_prompt_lens = prompt_lens[rid] + off, prompt_lens[rid]
    router = method.router
    keep = method.keep_rule(br_cu, torch.zeros_like(br_len)) if router is None and method.keep_rule else None

    # Padded attention layout: branch n's queries [Lb] over its context [Lc] then itself.
    Lc, Lb = int(prompt_lens.max()), int(br_len.max())
    c_col, b_col = torch.arange(Lc), torch.arange(Lb)
    c_valid, b_valid = c_col < prompt_lens[:, None], b_col < br_len[:, None]
    c_index = torch.where(c_valid, ctx_cu[br_ctx][:, None] + c_col, 0)
    b_index = torch.where(b_valid, br_cu[:-1, None] + b_col, 0)
    mask = torch.cat([c_valid[:, None, :].expand(N, Lb, Lc),
                      (b_col[None, :] <= b_col[:, None])[None] & b_valid[:, None, :]], -1)[:, None]
    past_index = c_index[c_valid]  # each branch's context tokens, branch after branch
    past_cu = F.pad(prompt_lens.cumsum(0), (1, 0))

    h = model.hf.model.embed_tokens(br_ids)
    cos, sin = (t[0] for t in model.hf.model.rotary_emb(h[None], positions[None]))
    ctx_pos = local_index(ctx_cu)
    ccos, csin = (t[0] for t in model.hf.model.rotary_emb(h[None], ctx_pos[None]))
    keeps = []
    for b, layer in enumerate(model.layers):
        q, k, v = model.qkv(b, h)
        _, kc, vc = model.qkv(b, out.hidden[b])
        gate = None if keep is None else keep[b]
        if router is not None and not router.is_dense(b):
            past = router.block_scores(b, kc)[past_index]
            logits = router.block_logits(b, router.block_scores(b, k), positions, token_prompt_lens, br_cu, past, past_cu)
            gate = router.keep(b, logits, positions, token_prompt_lens)
        qr, kr, kcr = rotate(q, cos, sin), rotate(k, cos, sin), rotate(kc, ccos, csin)
        keys = torch.cat([kcr[c_index], kr[b_index]], 1).transpose(1, 2)
        values = torch.cat([vc[c_index], v[b_index]], 1).transpose(1, 2)
        o = F.scaled_dot_product_attention(qr[b_index].transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        attn = layer.self_attn.o_proj(o.transpose(1, 2)[b_valid].reshape(T, -1))
        h_mid = h + attn
        h_full = h_mid + layer.mlp(layer.post_attention_layernorm(h_mid))
        if gate is None:
            gate = torch.ones(T, dtype=torch.bool)
        h = torch.where(gate[:, None], h_full, h)
        keeps.append(gate)
    if counter is not None:
        counter.add(out.keep, torch.ones(len(ctx_ids), dtype=torch.bool), method.routed_prompt(ctx_cu, ctx_len))
        counter.add(torch.stack(keeps), torch.zeros(T, dtype=torch.bool))
    inner = off < br_len[rid] - 1  # positions that predict a later token of their branch
    logprobs = F.log_softmax(model.hf.lm_head(model.hf.model.norm(h[inner])).float(), -1)
    token_lp = logprobs.gather(-1, br_ids.roll(-1)[inner][:, None])[:, 0]
    total = first[br_ctx, br_ids[br_cu[:-1]]]
    return total.index_add(0, rid[inner], token_lp)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike p +- z se)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def retention(value: float, dense: float, floor: float = 0.0) -> float:
    """(value - floor) / (dense - floor): share of the dense model's score (above `floor`) kept."""
    return (value - floor) / (dense - floor) if dense != floor else float("nan")


def paired_retention_interval(correct: Tensor, dense_correct: Tensor, floor: float = 0.0, samples: int = 2000,
                              seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of `retention` when both models answered the same items (bool [N]
    each): items are resampled together, so the interval reflects only where the two disagree,
    much narrower than two separate accuracy intervals would suggest."""
    n = len(correct)
    if n == 0:
        return (float("nan"), float("nan"))
    idx = torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))
    acc, dense = correct.float()[idx].mean(1), dense_correct.float()[idx].mean(1)
    ratios = ((acc - floor) / (dense - floor))[dense != floor].sort().values  # a resample at the floor has none
    if not len(ratios):
        return (float("nan"), float("nan"))
    return (float(ratios[int(0.025 * (len(ratios) - 1))]), float(ratios[int(0.975 * (len(ratios) - 1))]))
