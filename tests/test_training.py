import torch

from ftp_vllm.losses import distill_loss, ftp_loss, guide_weight, sparsity_hinge
from ftp_vllm.baselines import static_keep
from ftp_vllm.reference import TrainingGate
from ftp_vllm.train import train_router

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
    total, parts = ftp_loss(out, dense, static_keep(cu, TARGETS), torch.tensor(TARGETS), guide_weight(0, 10))
    total.backward()
    assert all(v.isfinite() for v in parts.values()) and parts["distill"] > 0
    assert router.mlp.fc1.weight.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in tiny_llama_ref.parameters())


def test_guide_loss_decreases(tiny_llama_ref):
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(16, 16))
    history = train_router(tiny_llama_ref, router, [(ids, cu)], steps=8, lr=0.1, guide_decay=100.0, weights=(1.0, 0.0, 0.0))
    assert history[-1]["guide"] < 0.5 * history[0]["guide"], [round(h["guide"], 3) for h in history]


def test_guide_weight_decays_to_zero():
    assert guide_weight(0, 10) == 1.0 and guide_weight(5, 10) == 0.5 and guide_weight(10, 10) == 0.0 == guide_weight(20, 10)


def test_train_router_runs_all_losses(tiny_llama_ref):
    router, ids, cu, _ = calibrated_router(tiny_llama_ref, TARGETS, lengths=(24, 24))
    history = train_router(tiny_llama_ref, router, [packed_batch([24, 24], seed=5)], steps=3)
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
