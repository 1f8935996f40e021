"""FTP's three router-training losses; only the router learns, the model is frozen.

guide      BCE of the router's keep probability against the static router's
           decisions, so training starts from a sensible prior; its weight
           decays to zero (`guide_weight`) so the router can then leave it.
sparsity   sum_b max(target_b - realised_b, 0), realised from the soft keep
           probabilities: one-sided, so only under-pruning costs.
distill    KL(dense || pruned) of the next-token distributions: what pruning
           must not change.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def guide_loss(
    router_logits: Tensor, teacher_keep: Tensor, routed: list[int], token_mask: Tensor | None = None
) -> Tensor:
    """BCE over the routed blocks' tokens; logits/teacher are [B, T]."""
    logits, target = router_logits[routed], teacher_keep[routed].float()
    if token_mask is not None:
        logits, target = logits[:, token_mask], target[:, token_mask]
    return F.binary_cross_entropy_with_logits(logits, target)


def guide_weight(step: int, decay_steps: int) -> float:
    """Linear decay from 1 to 0 over `decay_steps`."""
    return max(0.0, 1.0 - step / decay_steps) if decay_steps > 0 else 0.0


def realised_sparsity(keep_prob: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """[B] share of tokens each block skips, from keep probabilities [B, T]."""
    if token_mask is not None:
        keep_prob = keep_prob[:, token_mask]
    return 1 - keep_prob.mean(-1)


def sparsity_hinge(keep_prob: Tensor, targets: Tensor, token_mask: Tensor | None = None) -> Tensor:
    return (targets - realised_sparsity(keep_prob, token_mask)).clamp_min(0).sum()


def distill_loss(pruned_logits: Tensor, dense_logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of KL(dense || pruned); logits are [T, V]."""
    if token_mask is not None:
        pruned_logits, dense_logits = pruned_logits[token_mask], dense_logits[token_mask]
    log_pruned, log_dense = F.log_softmax(pruned_logits, -1), F.log_softmax(dense_logits, -1)
    return F.kl_div(log_pruned, log_dense, log_target=True, reduction="batchmean")


def ftp_loss(
    out,
    dense_logits: Tensor,
    teacher_keep: Tensor,
    targets: Tensor,
    guide_scale: float,
    weights=(1.0, 1.0, 1.0),
    token_mask: Tensor | None = None,
):
    """Weighted sum (guide weight times `guide_scale`) and the parts, from a `RoutedOutput` of
    a pass under `reference.TrainingGate`."""
    no_router = out.logits.new_zeros(())
    parts = {
        "guide": guide_loss(out.router_logits, teacher_keep, out.routed, token_mask) if out.routed else no_router,
        "sparsity": sparsity_hinge(out.keep_prob, targets, token_mask),
        "distill": distill_loss(out.logits, dense_logits, token_mask),
    }
    w_guide, w_sparsity, w_distill = weights
    total = w_guide * guide_scale * parts["guide"] + w_sparsity * parts["sparsity"] + w_distill * parts["distill"]
    return total, parts
