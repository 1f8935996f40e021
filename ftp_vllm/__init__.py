"""ftp_vllm: FTP token routing (fine-grained token-wise pruning) as a vLLM plugin."""

__version__ = "0.1.0"

ARCHITECTURES = {
    "FTPLlamaForCausalLM": "ftp_vllm.models.llama:FTPLlamaForCausalLM",
    "FTPQwen2ForCausalLM": "ftp_vllm.models.qwen2:FTPQwen2ForCausalLM",
}

# The stock architecture each FTP class routes; used to switch a checkpoint over.
BASE_ARCHITECTURES = {
    "LlamaForCausalLM": "FTPLlamaForCausalLM",
    "Qwen2ForCausalLM": "FTPQwen2ForCausalLM",
}


def register() -> None:
    """vLLM's `general_plugins` hook: runs in every engine process, so it must be
    cheap and idempotent.  Registration is by string, so the model code is only
    imported when vLLM builds a model."""
    from vllm import ModelRegistry

    from .ladder import install_level_check
    from .prefix_cache import install_cache_salt
    from .vllm_args import install_cli_hooks

    install_cli_hooks()
    install_cache_salt()
    install_level_check()
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
