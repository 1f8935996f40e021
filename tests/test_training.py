import pytest
import torch

from ftp_vllm.baselines import static_keep
from ftp_vllm.losses import decided_hinge, distill_loss, ftp_loss, guide_loss, guide_weight, sparsity_hinge
from ftp_vllm.reference import TrainingGate
from ftp_vllm.router import Router, soft_gate
from ftp_vllm.train import annealed, decided_tokens, train_router

from .conftest import calibrated_router, packed_batch

TARGETS = [0.0, 0.4, 0.4, 0.0]


def routed_with_bias(model, bias):
    router, ids, cu, _ = calibrated_router(model, TARGETS, lengths=(24, 24))
    with torch.no_grad():
        router.mlp.fc2.weight.zero_()
        router.mlp.fc2.bias.fill_(bias)
    return router, ids, cu


def test_sparsity_hinge():
    targets = torch.tensor([0.0, 0.5])
    assert sparsity_hinge(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), targets) == 0
    assert sparsity_hinge(torch.tensor([[1.0, 1.0], [0.2, 0.2]]), targets) == 0
    assert torch.isclose(sparsity_hinge(torch.tensor([[1.0, 1.0], [0.9, 0.9]]), targets), torch.tensor(0.4))


def test_hinge_on_model_zero_when_met_positive_when_under_pruned(tiny_llama_ref):
    targets = torch.tensor(TARGETS)
    router, ids, cu = routed_with_bias(tiny_llama_ref, -20.0)  # skips all but forced tokens
    out = tiny_llama_ref(ids, cu, keep=TrainingGate(router))
    assert sparsity_hinge(out.keep_prob, targets) == 0
    router, ids, cu = routed_with_bias(tiny_llama_ref, 20.0)  # keeps everything
    out = tiny_llama_ref(ids, cu, keep=TrainingGate(router))
    assert torch.isclose(sparsity_hinge(out.keep_prob, targets), targets.sum())


def test_distillation_zero_when_nothing_skipped(tiny_llama_ref):
    router, ids, cu = routed_with_bias(tiny_llama_ref, 20.0)
    dense = tiny_llama_ref(ids, cu).logits
    out = tiny_llama_ref(ids, cu, keep=TrainingGate(router))
    assert out.keep.all()
    assert distill_loss(out.logits, dense).abs() < 1e-6
    skip = tiny_llama_ref(ids, cu, keep=TrainingGate(routed_with_bias(tiny_llama_ref, -20.0)[0]))
    assert distill_loss(skip.logits, dense) > 1e-4


def test_all_losses_reach_the_router(tiny_llama_ref):
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(24, 24))
    dense = tiny_llama_ref(ids, cu).logits
    out = tiny_llama_ref(ids, cu, keep=TrainingGate(router))
    total, parts = ftp_loss(out, dense, static_keep(cu, TARGETS), decided_tokens(router, cu), guide_weight(0, 10))
    total.backward()
    assert all(v.isfinite() for v in parts.values()) and parts["distill"] > 0
    assert router.mlp.fc1.weight.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in tiny_llama_ref.parameters())


def test_guide_loss_decreases(tiny_llama_ref):
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(16, 16))
    history = train_router(tiny_llama_ref, router, [(ids, cu)], steps=8, lr=0.1, guide_decay=100.0,
                           weights=(1.0, 0.0, 0.0)).history
    assert history[-1]["guide"] < 0.5 * history[0]["guide"], [round(h["guide"], 3) for h in history]


def test_guide_weight_decays_to_zero():
    assert guide_weight(0, 10) == 1.0 and guide_weight(5, 10) == 0.5 and guide_weight(10, 10) == 0.0 == guide_weight(20, 10)


def test_train_router_runs_all_losses(tiny_llama_ref):
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(24, 24))
    history = train_router(tiny_llama_ref, router, [packed_batch([24, 24], seed=5)], steps=3).history
    assert len(history) == 3 and history[-1]["guide"] >= 0 and all(torch.isfinite(torch.tensor(h["total"])) for h in history)


def test_training_gate_keeps_tokens_of_a_kind_with_zero_target(tiny_llama_ref):
    router, ids, cu = routed_with_bias(tiny_llama_ref, -20.0)  # would skip every free token
    router.set_schedule(TARGETS, [0.0] * len(TARGETS))
    prompt_lens = torch.tensor([16, 16])
    out = tiny_llama_ref(ids, cu, prompt_lens, keep=TrainingGate(router))
    continuation = torch.cat([torch.arange(16, 24), torch.arange(40, 48)])
    assert out.keep[:, continuation].all() and not out.keep[1, 1:15].any()


def test_fit_guide_reproduces_the_static_router(tiny_llama_ref):
    """The warm start: after fitting the guide loss alone, calibrated thresholds give the
    static router's decisions (keep the most recent tokens) on almost every token."""
    from ftp_vllm.reference import calibrate_router_thresholds
    from ftp_vllm.train import fit_guide

    router, ids, cu, calib = calibrated_router(tiny_llama_ref, TARGETS, lengths=(48, 48, 48))
    static = static_keep(cu, TARGETS)
    before = (calib.keep == static)[1:3].float().mean()
    loss = fit_guide(tiny_llama_ref, router, ids, cu, steps=300)
    out = calibrate_router_thresholds(tiny_llama_ref, router, ids, cu)
    after = (out.keep == static)[1:3].float().mean()
    assert loss < 0.1 and after > 0.95 and after > before, (loss, float(before), float(after))


def test_calibrated_training_gate_realises_the_targets_on_every_pass(tiny_llama_ref):
    """The calibrated training gate: whatever the MLP's offset, hard decisions skip the targets' share
    of free tokens, so training shapes the ranking, not the rate."""
    for bias in (-20.0, 0.0, 20.0):
        router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(40, 40))
        with torch.no_grad():
            router.mlp.fc2.bias.add_(bias)
        out = tiny_llama_ref(ids, cu, keep=TrainingGate(router, calibrated=True))
        skipped = 1 - out.keep.float().mean(1)
        assert torch.allclose(skipped, torch.tensor([0.0, 32 / 80, 32 / 80, 0.0])), skipped
        assert out.keep_prob.requires_grad


def test_masked_hinge_counts_only_the_tokens_the_router_decides():
    """A batch whose decided prompt tokens meet the target: the hinge is zero however many
    tokens are kept regardless (a continuation under a zero decode target, a prompt shorter
    than min_prompt), which the hinge over every token was not."""
    router = Router(2, 1, 4, min_prompt=8)
    router.set_schedule([0.0, 0.5], [0.0, 0.0])
    # a 10-token prompt and a 6-token continuation; a 6-token prompt
    cu, prompt_lens = torch.tensor([0, 16, 22]), torch.tensor([10, 6])
    keep = torch.ones(2, 22)
    keep[1, 2:7] = 0.0  # half of the routed prompt's 10 tokens skipped; everything else kept
    decided = decided_tokens(router, cu, prompt_lens)
    assert decided.prompt[1].sum() == 10 and not decided.prompt[0].any() and not decided.decode.any()
    assert decided_hinge(keep, decided) == 0
    assert sparsity_hinge(keep, router.sparsity) > 0.2  # the forced keeps counted: a deficit no router can close
    keep[1, 6] = 1.0
    assert torch.isclose(decided_hinge(keep, decided), torch.tensor(0.1))
    router.set_schedule([0.0, 0.5], [0.0, 0.5])  # now continuation tokens count too, against the decode target
    decided = decided_tokens(router, cu, prompt_lens)
    keep[1, 6] = 0.0
    assert torch.isclose(decided_hinge(keep, decided), torch.tensor(0.5))
    keep[1, 10:13] = 0.0
    assert decided_hinge(keep, decided) == 0


def test_guide_counts_only_free_prompt_tokens(tiny_llama_ref):
    """Forced keeps and continuation tokens carry no teacher decision the router could follow."""
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(24, 24), decode_sparsity=TARGETS)
    prompt_lens = torch.tensor([16, 16])
    decided = decided_tokens(router, cu, prompt_lens)
    free = decided.free[1]
    assert free.sum() == 2 * 14 and not free[[0, 15, 24, 39]].any() and not free[16:24].any()
    out = tiny_llama_ref(ids, cu, prompt_lens, keep=TrainingGate(router))
    teacher = static_keep(cu, TARGETS, prompt_lens)
    teacher[:, ~free] = ~teacher[:, ~free]  # a teacher wrong everywhere the guide must not look
    assert torch.isclose(guide_loss(out.router_logits, teacher, decided.free),
                         guide_loss(out.router_logits, static_keep(cu, TARGETS, prompt_lens), decided.free))


def test_annealed_gate_gives_far_tokens_gradient_at_the_start():
    """A token 6 logits from its threshold (about a tenth of a prompt, for the warm-started MLP)
    gets a gradient comparable to one at the threshold at the annealing's start, and next to none
    at temperature 1."""
    assert annealed((8.0, 1.0), 0, 10) == 8.0 and annealed((8.0, 1.0), 9, 10) == pytest.approx(1.0)
    assert annealed((8.0, 1.0), 3, 7) == pytest.approx(8.0 ** 0.5) and annealed(2.0, 5, 10) == 2.0

    def gradients(temperature):
        logits = torch.tensor([6.0, 0.0], requires_grad=True)
        gate, _ = soft_gate(logits, torch.zeros(2, dtype=torch.bool), 0.0, temperature)
        gate.sum().backward()
        return logits.grad

    far, cut = gradients(annealed((8.0, 1.0), 0, 10))
    assert far > 0.5 * cut and far > 5 * gradients(1.0)[0]
    assert gradients(1.0)[0] < 0.01 * gradients(1.0)[1]


def test_train_router_anneals_the_gate_temperature(tiny_llama_ref, monkeypatch):
    import ftp_vllm.router as R

    seen, soft_gate_of = [], R.soft_gate
    monkeypatch.setattr(R, "soft_gate", lambda *a: seen.append(a[3]) or soft_gate_of(*a))
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(24, 24))
    train_router(tiny_llama_ref, router, [(ids, cu)], steps=4, temperature=(8.0, 1.0))
    per_step = seen[::2]  # two routed blocks a pass
    assert per_step == pytest.approx([8.0, 4.0, 2.0, 1.0]) and seen[1::2] == seen[::2]


def test_held_back_losses_are_on_the_same_batch_before_and_after(tiny_llama_ref):
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(24, 24))
    held_back = packed_batch([24, 24], seed=7)
    still = train_router(tiny_llama_ref, router, [packed_batch([24, 24], seed=5)], steps=3, lr=0.0, held_back=held_back)
    assert still.held_back["before"] == still.held_back["after"]  # nothing learnt: the same figures, so the same batch
    assert set(still.held_back["before"]) == {"guide", "sparsity", "distill"}
    moved = train_router(tiny_llama_ref, router, [packed_batch([24, 24], seed=5)], steps=3, lr=0.1, held_back=held_back)
    assert moved.held_back["before"] == still.held_back["after"]
    assert moved.held_back["after"] != moved.held_back["before"]
    assert train_router(tiny_llama_ref, router, [(ids, cu)], steps=1).held_back == {}
