"""With no router loaded, the FTP classes compute exactly what stock vLLM does."""

import pytest

from .conftest import real_prompts, run_engines

pytestmark = pytest.mark.engine


def assert_same_outputs(stock: dict, ftp: dict, ftp_arch: str, n_prompts: int, n_tokens: int) -> None:
    assert ftp["architecture"] == ftp_arch
    assert stock["architecture"] != ftp_arch
    assert len(stock["tokens"]) == n_prompts
    assert all(len(t) == n_tokens for t in stock["tokens"])
    assert len({tuple(t) for t in stock["tokens"]}) > n_prompts // 2, "degenerate outputs prove nothing"
    for i, (a, b) in enumerate(zip(stock["tokens"], ftp["tokens"])):
        assert a == b, f"prompt {i}: first difference at token {next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}"


def test_real_model_ftp_class_equals_stock_llama(real_model, tmp_path):
    """A router whose thresholds keep every token: routing runs at every routed block and
    skips nothing (float32; the FTP class without a router is checked on the tiny models below)."""
    from .test_vllm_cli import make_router

    keep_all = make_router(real_model, tmp_path / "keep-all", keep_all=True)
    prompts = real_prompts(32)
    routed = {"model": real_model, "dtype": "float32", "hf_overrides": {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": str(keep_all)}}
    trace = tmp_path / "trace.jsonl"
    runs = [
        {"llm": {"model": real_model, "dtype": "float32"}, "prompts": prompts, "max_tokens": 64},
        {"llm": routed, "prompts": prompts, "max_tokens": 64, "env": {"FTP_VLLM_TRACE": str(trace)}},
    ]
    stock, routed = run_engines(runs)
    assert stock["architecture"] == "LlamaForCausalLM"
    assert_same_outputs(stock, routed, "FTPLlamaForCausalLM", 32, 64)
    steps = routed["traces"][0]
    assert steps and all(set(step["keep"]) == {str(b) for b in range(1, 30)} for step in steps)


def test_tiny_models_ftp_classes_equal_stock(tiny_llama, tiny_qwen2):
    prompts = real_prompts(8)
    runs = []
    for folder, arch in ((tiny_llama, "FTPLlamaForCausalLM"), (tiny_qwen2, "FTPQwen2ForCausalLM")):
        runs.append({"llm": {"model": folder}, "prompts": prompts, "max_tokens": 16})
        runs.append({"llm": {"model": folder, "hf_overrides": {"architectures": [arch]}},
                     "prompts": prompts, "max_tokens": 16})
    llama_stock, llama_ftp, qwen_stock, qwen_ftp = run_engines(runs)
    assert_same_outputs(llama_stock, llama_ftp, "FTPLlamaForCausalLM", 8, 16)
    assert_same_outputs(qwen_stock, qwen_ftp, "FTPQwen2ForCausalLM", 8, 16)
