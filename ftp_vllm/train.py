"""Router training on the reference model: a warm start on the guide loss, then FTP's
three losses.

The warm start (`fit_guide`) fits the MLP to the static router's decisions on
features of one dense pass: cheap (no model forward per step), and it starts
training from the best prior known for a small model instead of a random
ranking, which a few dozen full-model steps cannot undo.

The training gate's temperature is annealed from a high start: at temperature 1
a token far from its block's threshold gets almost no gradient, so distillation
could only reshuffle the tokens at the boundary; a high temperature lets it move
every token's logit, and the end value sharpens the gate towards the hard rule
that serving applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .baselines import static_keep
from .losses import Decided, ftp_loss, guide_loss, guide_weight
from .reference import RoutedModel, Tokens, TrainingGate
from .router import Router

Batch = tuple[Tensor, ...]  # (input_ids, cu_seqlens[, distill_at[, prompt_lens]])


@dataclass
class TrainingRun:
    """What `train_router` reports."""

    history: list[dict[str, float]]  # per step: the total and each loss, at that step's weights
    held_back: dict[str, dict[str, float]] = field(default_factory=dict)  # "before"/"after": losses on one batch


def padded(batch: Batch) -> Batch:
    """(input_ids, cu_seqlens, distill_at, prompt_lens), None where the batch leaves them out."""
    return (*batch, None, None)[:4]


def decided_tokens(router: Router, cu_seqlens: Tensor, prompt_lens: Tensor | None = None) -> Decided:
    """The tokens `router` decides at each block of a batch, by the target they count against
    (`losses.Decided`)."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    prompt_targets, decode_targets = router.sparsity.clone(), router.decode_sparsity.clone()
    routed = tok.is_prompt & router.routes_prompt(tok.prompt_lens)
    free = tok.is_prompt & ~router.always_keep(tok.positions, tok.prompt_lens)
    on_prompt, on_decode = (prompt_targets > 0)[:, None], (decode_targets > 0)[:, None]
    return Decided(routed & on_prompt, ~tok.is_prompt & on_decode, free & on_prompt, prompt_targets, decode_targets)


def annealed(temperature: float | tuple[float, float], step: int, steps: int) -> float:
    """The gate temperature at `step` of `steps`: constant, or geometric from (start, end)."""
    start, end = (temperature, temperature) if isinstance(temperature, (int, float)) else temperature
    return start * (end / start) ** (step / max(steps - 1, 1))


def batch_loss(model: RoutedModel, router: Router, batch: Batch, dense_logits: Tensor, gate: TrainingGate,
               guide_scale: float, weights=(1.0, 1.0, 1.0)):
    """`ftp_loss` of `router` on one batch under `gate`: (total, parts)."""
    input_ids, cu_seqlens, distill_at, prompt_lens = batch
    teacher = static_keep(cu_seqlens, router.sparsity.tolist(), prompt_lens, router.min_prompt)
    out = model(input_ids, cu_seqlens, prompt_lens, keep=gate, logits_at=distill_at)
    return ftp_loss(out, dense_logits, teacher, decided_tokens(router, cu_seqlens, prompt_lens), guide_scale, weights)


@torch.no_grad()
def dense_logits(model: RoutedModel, batch: Batch) -> Tensor:
    input_ids, cu_seqlens, distill_at, _ = batch
    return model(input_ids, cu_seqlens, logits_at=distill_at).logits


@torch.no_grad()
def loss_parts(model: RoutedModel, router: Router, batch: Batch, dense: Tensor, gate: TrainingGate) -> dict:
    """Each loss, unweighted, of `router` on one batch."""
    return {k: round(v.item(), 6) for k, v in batch_loss(model, router, batch, dense, gate, 0.0)[1].items()}


def train_router(
    model: RoutedModel,
    router: Router,
    batches: Iterable[Batch],
    steps: int,
    lr: float = 1e-3,
    temperature: float | tuple[float, float] = 1.0,
    guide_decay: float = 0.5,
    weights=(1.0, 1.0, 1.0),
    progress: bool = False,
    calibrated: bool = False,
    held_back: Batch | None = None,
) -> TrainingRun:
    """Train `router.mlp` on (input_ids, cu_seqlens[, distill_at[, prompt_lens]]) batches (cycled)
    for `steps` steps; the guide weight reaches zero after `guide_decay` of them.  `distill_at`
    (token indices) limits distillation to the tokens whose outputs serving uses, and saves the
    LM head elsewhere; with `prompt_lens` the rest of each request is a continuation, routed by
    the decode schedule.  The training gate (`reference.TrainingGate`) is p > 0.5, or with
    `calibrated` thresholds at the targets; its `temperature` is constant or annealed from
    (start, end) (`annealed`).  The dense logits of each batch are computed once.  Returns the
    per-step losses and, with a `held_back` batch, each loss on it before and after training,
    under the final gate both times."""
    from tqdm.auto import tqdm

    optimiser = torch.optim.AdamW(router.mlp.parameters(), lr=lr)
    batches = [padded(b) for b in batches]
    dense_cache: dict[int, Tensor] = {}
    final_gate = TrainingGate(router, annealed(temperature, max(steps - 1, 0), steps), calibrated)
    if held_back is not None:
        held_back = padded(held_back)
        held_dense = dense_logits(model, held_back)
        before = loss_parts(model, router, held_back, held_dense, final_gate)
    history = []
    bar = tqdm(range(steps), desc="router training", disable=not progress, leave=False)
    for step in bar:
        i = step % len(batches)
        if i not in dense_cache:
            dense_cache[i] = dense_logits(model, batches[i])
        gate = TrainingGate(router, annealed(temperature, step, steps), calibrated)
        guide_scale = guide_weight(step, int(guide_decay * steps))
        total, parts = batch_loss(model, router, batches[i], dense_cache[i], gate, guide_scale, weights)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in parts.items()}})
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
    run = TrainingRun(history)
    if held_back is not None:
        run.held_back = {"before": before, "after": loss_parts(model, router, held_back, held_dense, final_gate)}
    return run


def fit_guide(
    model: RoutedModel,
    router: Router,
    input_ids: Tensor,
    cu_seqlens: Tensor,
    prompt_lens: Tensor | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    max_rows: int = 32768,
    seed: int = 0,
) -> float:
    """Fit `router.mlp` to the static router's prompt decisions (the guide loss alone, over the
    tokens training's guide counts) on the router features of a dense pass over the text (at
    most `max_rows` token-block rows, drawn at random); returns the final guide loss."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    free = decided_tokens(router, cu_seqlens, prompt_lens).free
    with torch.no_grad():
        hidden = model(input_ids, cu_seqlens, prompt_lens, return_hidden=True, logits_at=input_ids.new_zeros(0)).hidden
        teacher = static_keep(cu_seqlens, router.sparsity.tolist(), prompt_lens, router.min_prompt)
        rows, targets = [], []
        for b in range(router.num_blocks):
            if not free[b].any():
                continue
            _, k, _ = model.qkv(b, hidden[b])
            raw = router.block_features(b, router.block_scores(b, k), tok.positions, tok.prompt_lens, cu_seqlens)
            rows.append(((raw - router.feature_mean[b]) / router.feature_std[b])[free[b]])
            targets.append(teacher[b][free[b]])
    if not rows:
        return 0.0
    features, targets = torch.cat(rows), torch.cat(targets)
    if len(features) > max_rows:
        pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_rows]
        features, targets = features[pick], targets[pick]
    optimiser = torch.optim.Adam(router.mlp.parameters(), lr=lr)
    for _ in range(steps):
        loss = guide_loss(router.mlp(features), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return loss.item()
