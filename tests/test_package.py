import importlib.metadata
import subprocess
import sys
from pathlib import Path

import torch

import ftp_vllm


def test_plugin_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "ftp_vllm" and ep.value == "ftp_vllm:register" for ep in eps)


def test_register_is_idempotent_and_resolves_classes():
    from vllm import ModelRegistry
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    ftp_vllm.register()
    ftp_vllm.register()
    archs = ModelRegistry.get_supported_archs()
    assert {"FTPLlamaForCausalLM", "FTPQwen2ForCausalLM"} <= set(archs)
    from ftp_vllm.models.llama import FTPLlamaForCausalLM
    from ftp_vllm.models.qwen2 import FTPQwen2ForCausalLM

    assert issubclass(FTPLlamaForCausalLM, LlamaForCausalLM)
    assert issubclass(FTPQwen2ForCausalLM, Qwen2ForCausalLM)


def test_console_scripts():
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([bin_dir / "ftp-vllm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prepare-model" in out.stdout
    if not torch.cuda.is_available():
        # `vllm` itself must work on the CPU build (it asks for a `vllm` distribution's version).
        out = subprocess.run([bin_dir / "vllm", "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and "cpu" in out.stdout, out.stderr[-2000:]


def test_tiny_models_load_in_transformers(tiny_llama, tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder, biased in ((tiny_llama, False), (tiny_qwen2, True)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("Tiny models share the real tokenizer.", return_tensors="pt")["input_ids"]
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
        assert torch.isfinite(logits).all()
        assert (model.model.layers[0].self_attn.q_proj.bias is not None) == biased
