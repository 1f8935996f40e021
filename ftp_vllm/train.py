"""Router training loop on the reference model: FTP's three losses, equal weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .losses import ftp_loss, guide_weight
from .reference import RoutedModel, static_keep
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
) -> list[dict[str, float]]:
    """Train `router.mlp` on (input_ids, cu_seqlens[, distill_at[, prompt_lens]]) batches (cycled)
    for `steps` steps; the guide weight reaches zero after `guide_decay` of them.  `distill_at`
    (token indices) limits distillation to the tokens whose outputs serving uses, and saves the
    LM head elsewhere; with `prompt_lens` the rest of each request is a continuation, routed by
    the decode schedule.  The dense logits of each batch are computed once.  Returns per-step losses."""
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
        out = model(input_ids, cu_seqlens, prompt_lens, router=router, mode="train", temperature=temperature,
                    logits_at=distill_at)
        guide_scale = guide_weight(step, int(guide_decay * steps))
        total, parts = ftp_loss(out, dense_cache[i], teacher, targets, guide_scale, weights)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in parts.items()}})
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
    return history
