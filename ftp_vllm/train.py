"""Router training on the reference model: a warm start on the guide loss, then FTP's
three losses.

The warm start (`fit_guide`) fits the MLP to the static router's decisions on
features of one dense pass: cheap (no model forward per step), and it starts
training from the best prior known for a small model instead of a random
ranking, which a few dozen full-model steps cannot undo.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .losses import ftp_loss, guide_loss, guide_weight
from .baselines import static_keep
from .reference import RoutedModel, Tokens, TrainingGate
from .router import Router


def train_router(
    model: RoutedModel,
    router: Router,
    batches: Iterable[tuple[Tensor, ...]],
    steps: int,
    lr: float = 1e-3,
    temperature: float = 1.0,
    guide_decay: float = 0.5,
    weights=(1.0, 1.0, 1.0),
    progress: bool = False,
    calibrated: bool = False,
) -> list[dict[str, float]]:
    """Train `router.mlp` on (input_ids, cu_seqlens[, distill_at[, prompt_lens]]) batches (cycled)
    for `steps` steps; the guide weight reaches zero after `guide_decay` of them.  `distill_at`
    (token indices) limits distillation to the tokens whose outputs serving uses, and saves the
    LM head elsewhere; with `prompt_lens` the rest of each request is a continuation, routed by
    the decode schedule.  The training gate (`reference.TrainingGate`) is p > 0.5, or with
    `calibrated` thresholds at the targets.  The dense logits of each batch are computed once.
    Returns per-step losses."""
    from tqdm.auto import tqdm

    optimiser = torch.optim.AdamW(router.mlp.parameters(), lr=lr)
    targets = router.sparsity.clone()
    batches = [(*b, None, None)[:4] for b in batches]
    dense_cache: dict[int, Tensor] = {}
    history = []
    bar = tqdm(range(steps), desc="router training", disable=not progress, leave=False)
    for step in bar:
        i = step % len(batches)
        input_ids, cu_seqlens, distill_at, prompt_lens = batches[i]
        if i not in dense_cache:
            with torch.no_grad():
                dense_cache[i] = model(input_ids, cu_seqlens, logits_at=distill_at).logits
        teacher = static_keep(cu_seqlens, targets.tolist(), prompt_lens)
        out = model(input_ids, cu_seqlens, prompt_lens, keep=TrainingGate(router, temperature, calibrated),
                    logits_at=distill_at)
        guide_scale = guide_weight(step, int(guide_decay * steps))
        total, parts = ftp_loss(out, dense_cache[i], teacher, targets, guide_scale, weights)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in parts.items()}})
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
    return history


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
    """Fit `router.mlp` to the static router's prompt decisions (the guide loss alone) on the
    router features of a dense pass over the text (at most `max_rows` token-block rows, drawn
    at random); returns the final guide loss."""
    tok = Tokens.of(cu_seqlens, prompt_lens)
    with torch.no_grad():
        hidden = model(input_ids, cu_seqlens, prompt_lens, return_hidden=True, logits_at=input_ids.new_zeros(0)).hidden
        teacher = static_keep(cu_seqlens, router.sparsity.tolist(), prompt_lens)
        free = tok.is_prompt & ~tok.always
        rows, targets = [], []
        for b in range(router.num_blocks):
            if router.is_dense(b):
                continue
            _, k, _ = model.qkv(b, hidden[b])
            raw = router.block_features(b, router.block_scores(b, k), tok.positions, tok.prompt_lens, cu_seqlens)
            rows.append(((raw - router.feature_mean[b]) / router.feature_std[b])[free])
            targets.append(teacher[b][free])
    if not rows:
        return 0.0
    features, targets = torch.cat(rows), torch.cat(targets)
    if len(features) > max_rows:
        pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_rows]
        features, targets = features[pick], targets[pick]
    optimiser = torch.optim.Adam(router.mlp.parameters(), lr=lr)
    for _ in range(steps):
        loss = guide_loss(router.mlp(features)[None], targets[None], [0])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return loss.item()
