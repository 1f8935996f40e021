"""FTP's three router-training losses; only the router learns, the model is frozen.

guide      BCE of the router's keep probability against the static router's
           decisions, so training starts from a sensible prior; its weight
           decays to zero (`guide_weight`) so the router can then leave it.
sparsity   sum_b max(target_b - realised_b, 0), realised from the soft keep
           probabilities: one-sided, so only under-pruning costs.
distill    KL(dense || pruned) of the next-token distributions: what pruning
           must not change.

The guide and the hinge count only the tokens the router decides for a target
(`Decided`): a token no threshold can skip would add a deficit, or a teacher
decision, that no change of the router can move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class Decided:
    """[B, T] masks of the tokens a router decides at each block, by the target they count
    against.  `prompt`: the prompt tokens of the prompts it routes, its forced keeps included
    (they count as kept, as threshold calibration and the serving counters count them);
    `decode`: continuation tokens; each only where the block's target is above 0.  `free`: the
    prompt tokens no rule keeps, the ones the guide fits."""

    prompt: Tensor
    decode: Tensor
    free: Tensor
    prompt_targets: Tensor  # [B]
    decode_targets: Tensor  # [B]


def guide_loss(router_logits: Tensor, teacher_keep: Tensor, mask: Tensor | None = None) -> Tensor:
    """BCE of the logits against the teacher's decisions (both [B, T]) over `mask` [B, T]
    (default every entry); 0 without any."""
    if mask is not None:
        router_logits, teacher_keep = router_logits[mask], teacher_keep[mask]
    if not router_logits.numel():
        return router_logits.new_zeros(())
    return F.binary_cross_entropy_with_logits(router_logits, teacher_keep.float())


def guide_weight(step: int, decay_steps: int) -> float:
    """Linear decay from 1 to 0 over `decay_steps`."""
    return max(0.0, 1.0 - step / decay_steps) if decay_steps > 0 else 0.0


def realised_sparsity(keep_prob: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """[B] share of tokens each block skips, from keep probabilities [B, T], over `token_mask`
    ([T] or [B, T]; default every token); a block with none there reads 1, meeting any target."""
    if token_mask is None:
        return 1 - keep_prob.mean(-1)
    mask = token_mask.expand_as(keep_prob).to(keep_prob.dtype)
    return 1 - (keep_prob * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def sparsity_hinge(keep_prob: Tensor, targets: Tensor, token_mask: Tensor | None = None) -> Tensor:
    return (targets - realised_sparsity(keep_prob, token_mask)).clamp_min(0).sum()


def decided_hinge(keep_prob: Tensor, decided: Decided) -> Tensor:
    """The hinge of each block's prompt and decode tokens against its own targets."""
    return (sparsity_hinge(keep_prob, decided.prompt_targets, decided.prompt)
            + sparsity_hinge(keep_prob, decided.decode_targets, decided.decode))


def distill_loss(pruned_logits: Tensor, dense_logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of KL(dense || pruned); logits are [T, V]."""
    if token_mask is not None:
        pruned_logits, dense_logits = pruned_logits[token_mask], dense_logits[token_mask]
    log_pruned, log_dense = F.log_softmax(pruned_logits, -1), F.log_softmax(dense_logits, -1)
    return F.kl_div(log_pruned, log_dense, log_target=True, reduction="batchmean")


def ftp_loss(out, dense_logits: Tensor, teacher_keep: Tensor, decided: Decided, guide_scale: float,
             weights=(1.0, 1.0, 1.0)):
    """Weighted sum (guide weight times `guide_scale`) and the parts, from a `RoutedOutput` of
    a pass under `reference.TrainingGate`; the guide over `decided.free`, the hinge over the
    decided tokens of each kind."""
    parts = {
        "guide": guide_loss(out.router_logits, teacher_keep, decided.free),
        "sparsity": decided_hinge(out.keep_prob, decided),
        "distill": distill_loss(out.logits, dense_logits),
    }
    w_guide, w_sparsity, w_distill = weights
    total = w_guide * guide_scale * parts["guide"] + w_sparsity * parts["sparsity"] + w_distill * parts["distill"]
    return total, parts
