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
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
    lr: float = 1e-3,
    temperature: float = 1.0,
    guide_decay: float = 0.5,
    weights=(1.0, 1.0, 1.0),
) -> list[dict[str, float]]:
    """Train `router.mlp` on (input_ids, cu_seqlens) batches (cycled) for `steps` steps; the guide
    weight reaches zero after `guide_decay` of them.  Returns the per-step losses."""
    optimiser = torch.optim.AdamW(router.mlp.parameters(), lr=lr)
    targets = router.sparsity.clone()
    batches = list(batches)
    history = []
    for step in range(steps):
        input_ids, cu_seqlens = batches[step % len(batches)]
        with torch.no_grad():
            dense_logits = model(input_ids, cu_seqlens).logits
        teacher = static_keep(cu_seqlens, targets.tolist())
        out = model(input_ids, cu_seqlens, router=router, mode="train", temperature=temperature)
        guide_scale = guide_weight(step, int(guide_decay * steps))
        total, parts = ftp_loss(out, dense_logits, teacher, targets, guide_scale, weights)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in parts.items()}})
    return history
