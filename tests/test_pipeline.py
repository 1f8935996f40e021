from ftp_vllm.checkpoint import check_compatible, load_checkpoint
from ftp_vllm.cli import main

TINY_SETTINGS = [
    "--steps", "3", "--chunk-len", "32", "--context", "24", "--search-chunks", "1", "--calib-chunks", "2",
    "--train-chunks", "2", "--eval-chunks", "2", "--population", "4", "--generations", "2",
    "--router-generations", "2", "--min-prompt", "0", "--no-progress",
]


def test_train_cli_end_to_end_on_tiny_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "router"
    argv = ["train", "--model", tiny_llama, "--sparsity", "0.3", "--decode-sparsity", "0.15", "--out", str(out), *TINY_SETTINGS]
    assert main(argv) == 0
    assert "realised on held-out text" in capsys.readouterr().out
    router, config = load_checkpoint(out)
    check_compatible(config, tiny_llama)
    assert abs(router.sparsity.mean().item() - 0.3) < 1e-6 and abs(router.decode_sparsity.mean().item() - 0.15) < 1e-6
    assert config["target_sparsity"] == 0.3 and config["decode_target_sparsity"] == 0.15
    assert config["training"]["command"].startswith("ftp-vllm train --model")
    assert len(config["training"]["loss"]) == 4 and config["quality"]["routed"]["ppl_ratio_to_dense"] > 0
    selection = config["training"]["selection"]
    assert selection["kept"] in ("trained", "warm start") and set(selection["search_text_continuation_kl"]) == {"warm start", "trained"}
    cal = config["realised_sparsity"]["calibration_text (thresholds fitted here)"]
    assert abs(cal["prompt"]["mean"] - 0.3) < 0.05 and abs(cal["decode"]["mean"] - 0.15) < 0.1


def test_train_cli_reports_bad_model(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "none"), "--sparsity", "0.3", "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
