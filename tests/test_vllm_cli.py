"""`--ftp-router` on vLLM's command line: overrides for a good router, one clear line for a bad one."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftp_vllm.vllm_args import apply_ftp_args


def make_router(model_folder: str, out: Path, keep_all: bool = False) -> Path:
    from ftp_vllm.checkpoint import fingerprint, save_checkpoint
    from ftp_vllm.router import Router

    config = json.loads((Path(model_folder) / "config.json").read_text())
    heads = config["num_attention_heads"]
    router = Router(config["num_hidden_layers"], config["num_key_value_heads"],
                    config.get("head_dim") or config["hidden_size"] // heads)
    router.set_schedule([0.0] + [0.3] * (config["num_hidden_layers"] - 1))
    if keep_all:
        router.keep_every_token()
    return save_checkpoint(out, router, {"base_model": fingerprint(model_folder)})


def namespace(model, router):
    return argparse.Namespace(model=model, ftp_router=router, hf_overrides=None, enforce_eager=False,
                              served_model_name=None, middleware=[])


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """`--ftp-router` sets variables for the engine processes; keep them out of other tests."""
    monkeypatch.setenv("FTP_VLLM_ROUTER", "")
    monkeypatch.setenv("FTP_VLLM_SPARSITY", "")
    monkeypatch.setenv("FTP_VLLM_STATS", str(tmp_path / "stats.json"))


def test_router_becomes_overrides(tiny_llama, tmp_path):
    router = make_router(tiny_llama, tmp_path / "r")
    args = namespace(tiny_llama, str(router))
    apply_ftp_args(args)
    assert args.hf_overrides == {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": str(router)}
    assert args.enforce_eager is False  # routing runs in vLLM's default compiled mode too
    assert args.middleware == ["ftp_vllm.server_routes.FTPRoutes"]


def test_default_level_becomes_an_override_and_is_checked(tiny_llama, tmp_path):
    router = make_router(tiny_llama, tmp_path / "r")  # its level: the schedule's mean, 0.225
    args = namespace(tiny_llama, str(router))
    args.ftp_sparsity = 0.0
    apply_ftp_args(args)
    assert args.hf_overrides["ftp_sparsity"] == 0.0
    for level, router_arg, expected in ((0.5, str(router), "must be a number in [0, 0.225]"),
                                        (0.2, None, "give --ftp-router too")):
        args = namespace(tiny_llama, router_arg)
        args.ftp_sparsity = level
        assert expected in _error(args)


def test_no_router_leaves_args_alone(tiny_llama):
    args = namespace(tiny_llama, None)
    apply_ftp_args(args)
    assert args.hf_overrides is None and args.enforce_eager is False


def _error(args) -> str:
    with pytest.raises(SystemExit) as e:
        apply_ftp_args(args)
    message = str(e.value.code)
    assert message.startswith("ftp-vllm: error: ") and "\n" not in message
    return message


def test_bad_routers_get_one_clear_line(tiny_llama, tiny_qwen2, tmp_path):
    assert "does not exist" in _error(namespace(tiny_llama, str(tmp_path / "missing")))
    assert "no shipped router named 'nope'" in _error(namespace(tiny_llama, "nope"))

    router = make_router(tiny_llama, tmp_path / "r")
    assert "trained for" in _error(namespace(tiny_qwen2, str(router)))

    no_weights = make_router(tiny_llama, tmp_path / "no-weights")
    (no_weights / "router.safetensors").unlink()
    assert "missing router.safetensors" in _error(namespace(tiny_llama, str(no_weights)))

    layers = make_router(tiny_llama, tmp_path / "layers")
    config = json.loads((layers / "ftp_config.json").read_text())
    config["base_model"]["num_layers"] += 1
    (layers / "ftp_config.json").write_text(json.dumps(config))
    assert "layers" in _error(namespace(tiny_llama, str(layers)))

    garbage = make_router(tiny_llama, tmp_path / "garbage")
    (garbage / "router.safetensors").write_bytes(b"not safetensors")
    assert "unreadable" in _error(namespace(tiny_llama, str(garbage)))


@pytest.mark.engine
def test_vllm_serve_stops_at_once_on_a_bad_router(tiny_llama, tmp_path):
    vllm = Path(sys.executable).parent / "vllm"
    proc = subprocess.run([str(vllm), "serve", tiny_llama, "--ftp-router", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"ftp-vllm: error: router checkpoint folder {tmp_path / 'missing'} does not exist"
