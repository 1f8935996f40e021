"""Randomly initialised tiny Llama / Qwen2 folders for fast tests.

They load in transformers and vLLM like the real model and share its real
tokenizer, but their weights are noise: never evidence for quality or speed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .model_store import DEFAULT_MODEL, WEIGHTS_FILE, prepare_tokenizer

TINY_SHAPE = dict(
    hidden_size=128,  # head_dim 32: vLLM's CPU attention has no kernel for 16
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def write_tiny_model(out: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny `arch` ('llama' or 'qwen2', which has q/k/v biases) model folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = prepare_tokenizer(DEFAULT_MODEL)
    vocab_size = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    shape = {**TINY_SHAPE, "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    config = config_cls(**shape)
    torch.manual_seed(seed)
    model = model_cls(config).float()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["architectures"] = [model_cls.__name__]
    config_dict["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    for f in tokenizer.iterdir():
        shutil.copy2(f, out / f.name)
    return out
