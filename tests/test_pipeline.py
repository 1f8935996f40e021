import pytest
import torch

from ftp_vllm.checkpoint import check_compatible, load_checkpoint
from ftp_vllm.cli import main

TINY_SETTINGS = [
    "--steps", "3", "--chunk-len", "32", "--context", "24", "--search-chunks", "1", "--calib-chunks", "2",
    "--train-chunks", "2", "--eval-chunks", "2", "--population", "4", "--generations", "2",
    "--router-generations", "2", "--min-prompt", "0", "--short-context", "8", "--no-progress",
]


def test_train_cli_end_to_end_on_tiny_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "router"
    argv = ["train", "--model", tiny_llama, "--sparsity", "0.3", "--decode-sparsity", "0.15", "--out", str(out),
            "--temperature-start", "4", *TINY_SETTINGS]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "realised on held-out text" in summary and "on a held-back batch (before -> after)" in summary
    router, config = load_checkpoint(out)
    check_compatible(config, tiny_llama)
    assert abs(router.sparsity.mean().item() - 0.3) < 1e-6 and abs(router.decode_sparsity.mean().item() - 0.15) < 1e-6
    assert config["target_sparsity"] == 0.3 and config["decode_target_sparsity"] == 0.15
    assert config["training"]["command"].startswith("ftp-vllm train --model")
    assert "8-token routed prompt" in config["search"]["fitness"]
    assert len(config["training"]["loss"]) == 4 and config["quality"]["routed"]["ppl_ratio_to_dense"] > 0
    held_back = config["training"]["held_back_loss"]
    assert set(held_back["before"]) == set(held_back["after"]) == {"guide", "sparsity", "distill"}
    assert "calibration chunks" in held_back["batch"]
    assert config["training"]["settings"]["temperature_start"] == 4.0 and config["training"]["settings"]["temperature"] == 1.0
    selection = config["training"]["selection"]
    assert selection["kept"] in ("trained", "warm start") and set(selection["search_text_continuation_kl"]) == {"warm start", "trained"}
    cal = config["realised_sparsity"]["calibration_text (thresholds fitted here)"]
    assert abs(cal["prompt"]["mean"] - 0.3) < 0.05 and abs(cal["decode"]["mean"] - 0.15) < 0.1
    assert router.short_lengths and router.threshold_length == 24
    assert list(config["realised_sparsity"]["short_prompts"]) == [str(n) for n in router.short_lengths]
    stages = config["training"]["stage_wall_time_s"]
    assert list(stages) == ["load", "static_search", "input_calibration_and_warm_start", "training", "router_search",
                            "thresholds_and_evaluation"]
    assert sum(stages.values()) <= config["training"]["wall_time_s"] + 0.5


def test_calibrate_short_prompts_cli_upgrades_an_older_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "router"
    assert main(["train", "--model", tiny_llama, "--sparsity", "0.3", "--decode-sparsity", "0", "--out", str(out),
                 *TINY_SETTINGS]) == 0
    trained, _ = load_checkpoint(out)
    # as written before short-prompt thresholds existed
    from ftp_vllm.router import Router
    from .conftest import save_changed_router

    old = Router(trained.num_blocks, trained.mean_query.shape[1], trained.mean_query.shape[2], min_prompt=0)
    old.load_state_dict({k: v for k, v in trained.state_dict().items() if k != "threshold_short"}, strict=False)
    save_changed_router(old, load_checkpoint(out)[1], tmp_path / "old")
    capsys.readouterr()
    assert main(["calibrate-short-prompts", str(tmp_path / "old"), "--out", str(tmp_path / "new")]) == 0
    assert "tokens:" in capsys.readouterr().out
    new, config = load_checkpoint(tmp_path / "new")
    assert new.short_lengths == trained.short_lengths
    torch.testing.assert_close(new.threshold_short, trained.threshold_short)  # the same calibration as training's
    assert torch.equal(new.threshold_prompt, trained.threshold_prompt)
    assert config["training"]["short_thresholds_command"].startswith("ftp-vllm calibrate-short-prompts")
    # routing prompts from another length on: thresholds calibrated down to it
    assert main(["calibrate-short-prompts", str(tmp_path / "new"), "--min-prompt", "12", "--out",
                 str(tmp_path / "from12")]) == 0
    from12, _ = load_checkpoint(tmp_path / "from12")
    assert from12.min_prompt == 12 and from12.short_lengths[0] == 12 and from12.short_lengths[-1] < 24
    assert torch.equal(from12.threshold_prompt, trained.threshold_prompt)
    # a checkpoint that does not record its training settings: a clear error, nothing written
    save_changed_router(old, {k: v for k, v in config.items() if k != "training"}, tmp_path / "untrained")
    assert main(["calibrate-short-prompts", str(tmp_path / "untrained"), "--out", str(tmp_path / "none")]) == 2
    assert "no usable training settings" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_train_cli_reports_bad_model(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "none"), "--sparsity", "0.3", "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rescale_cli_scales_the_schedule_and_calibrates_again(tiny_llama, tmp_path, capsys):
    out = tmp_path / "router"
    assert main(["train", "--model", tiny_llama, "--sparsity", "0.3", "--decode-sparsity", "0.15", "--out", str(out),
                 *TINY_SETTINGS]) == 0
    source, _ = load_checkpoint(out)
    capsys.readouterr()
    assert main(["rescale", str(out), "--sparsity", "0.2", "--out", str(tmp_path / "s20")]) == 0
    assert "rescaled from" in capsys.readouterr().out
    router, config = load_checkpoint(tmp_path / "s20")
    torch.testing.assert_close(router.sparsity, source.sparsity * (0.2 / 0.3))
    torch.testing.assert_close(router.decode_sparsity, source.decode_sparsity * (0.2 / 0.3))
    assert config["target_sparsity"] == 0.2 and config["decode_target_sparsity"] == 0.1
    for name in ("mlp.fc1.weight", "mlp.fc2.weight", "mean_query", "feature_mean", "feature_std"):
        assert torch.equal(router.state_dict()[name], source.state_dict()[name])
    cal = config["realised_sparsity"]["calibration_text (thresholds fitted here)"]
    assert abs(cal["prompt"]["mean"] - 0.2) < 0.05 and abs(cal["decode"]["mean"] - 0.1) < 0.1
    assert not torch.equal(router.threshold_prompt, source.threshold_prompt)
    assert config["training"]["rescaled"]["from_target_sparsity"] == 0.3
    assert config["training"]["rescaled"]["command"].startswith("ftp-vllm rescale")
    # a ladder: the router's own level as it is, another rescaled, one MLP
    from ftp_vllm.checkpoint import load_ladder

    assert main(["ladder", str(out), "--levels", "0", "0.2", "0.3", "--no-progress", "--out", str(tmp_path / "dial")]) == 0
    assert "level 0.2: held-out prompt sparsity" in capsys.readouterr().out
    ladder, config = load_ladder(tmp_path / "dial")
    assert ladder.levels == [0.0, 0.2, 0.3] and ladder.default == 0.3
    assert config["ladder"]["rungs"][0]["made_by"].startswith("ftp-vllm ladder")
    for rung, want in zip(ladder.rungs[1:], (router, source)):
        for name, value in want.state_dict().items():
            assert torch.equal(rung.state_dict()[name], value), name
    # searched further from the scaled schedule: the mean still the target, never worse than scaled
    assert main(["rescale", str(out), "--sparsity", "0.2", "--search-generations", "2", "--no-progress",
                 "--out", str(tmp_path / "s20-searched")]) == 0
    searched, config = load_checkpoint(tmp_path / "s20-searched")
    search = config["training"]["rescaled"]["search"]
    summary = capsys.readouterr().out
    assert "then searched with the router" in summary and f"in {search['evaluations']} evaluations" in summary
    assert config["training"]["rescaled"]["wall_time_s"] > 0
    assert abs(searched.sparsity.mean().item() - 0.2) < 1e-6 and searched.sparsity.tolist() == pytest.approx(search["schedule"])
    assert search["fitness_value"] <= search["scaled_fitness"] + 1e-6 and "8-token routed prompt" in search["fitness"]
    assert abs(searched.decode_sparsity.mean().item() - 0.1) < 1e-6
    # trained further at its own level: same schedule, the training and its selection recorded
    assert main(["rescale", str(out), "--train-steps", "2", "--lr", "0.01", "--no-progress",
                 "--out", str(tmp_path / "s30-trained")]) == 0
    assert "MLP trained further for 2 steps" in capsys.readouterr().out
    trained, config = load_checkpoint(tmp_path / "s30-trained")
    assert torch.equal(trained.sparsity, source.sparsity) and config["target_sparsity"] == 0.3
    assert config["training"]["rescaled"]["trained"]["steps"] == 2 and config["training"]["rescaled"]["trained"]["lr"] == 0.01
    selection = config["training"]["selection"]
    kl = selection["search_text_continuation_kl"]
    assert selection["kept"] == ("trained" if kl["trained"] < kl["warm start"] else "warm start")
    moved = not torch.equal(trained.mlp.fc1.weight, source.mlp.fc1.weight)
    assert moved == (selection["kept"] == "trained")
    assert set(config["training"]["held_back_loss"]["after"]) == {"guide", "sparsity", "distill"}
    # a target the schedule cannot reach: a clear error, nothing written
    from .conftest import save_changed_router

    uneven, source_config = load_checkpoint(out)
    uneven.set_schedule([0.0, 0.6, 0.6, 0.0], [0.0, 0.3, 0.3, 0.0])
    save_changed_router(uneven, source_config, tmp_path / "uneven")
    assert main(["rescale", str(tmp_path / "uneven"), "--sparsity", "0.9", "--out", str(tmp_path / "s90")]) == 2
    assert "cannot be scaled to 0.9" in capsys.readouterr().err and not (tmp_path / "s90").exists()
