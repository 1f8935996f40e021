import random
from pathlib import Path

import pytest
import torch

# Tiny matmuls gain nothing from threads, and on a shared machine waking a pool
# costs ~10 ms each.  Engines run in their own processes with their own threads.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """The script `benchmarks/NAME.py` as a module (the scripts are not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same random numbers whichever tests ran before it: a test that
    draws unseeded inputs gets the same ones in every run, so it cannot pass or fail by chance."""
    random.seed(0)
    torch.manual_seed(0)


def real_prompts(n: int, words: int = 40) -> list[str]:
    """Openings of the Python language reference's topics: real English prose, offline."""
    from pydoc_data.topics import topics

    texts = [" ".join(topics[k].split()[:words]) for k in sorted(topics) if len(topics[k].split()) >= words]
    return texts[:n]


def run_engines(runs: list[dict], timeout: int = 1800) -> list[dict]:
    """Per run, the resolved architecture and greedy token ids per prompt, from vLLM
    engines started one after another in one fresh process.

    A run is {"llm": {LLM kwargs; eager unless they say}, "prompts": [...], "max_tokens": N,
    "one_by_one": bool, "also_together": bool, "levels": [per prompt], "env": {...}}; its answer is
    {"architecture", "tokens", "traces", "score_writes"[, "tokens_together"]} (see
    `engine_worker`)."""
    from ftp_vllm.engine_process import EngineProcess

    from .engine_worker import greedy_outputs

    results = []
    with EngineProcess(timeout=timeout) as engine:
        for run in runs:
            started = engine.start({"enforce_eager": True, **run["llm"]}, run.get("env"))
            outputs = engine.run(greedy_outputs, prompts=run["prompts"], max_tokens=run["max_tokens"],
                                 one_by_one=run.get("one_by_one", False),
                                 also_together=run.get("also_together", False), levels=run.get("levels"))
            engine.stop()
            results.append({"architecture": started["architecture"], **outputs})
    return results


@pytest.fixture(scope="session")
def real_model() -> str:
    from ftp_vllm.model_store import prepare_model

    return str(prepare_model())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from ftp_vllm.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    from ftp_vllm.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2"))


@pytest.fixture(scope="session")
def tiny_dirs(tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request, tiny_dirs):
    from ftp_vllm.reference import RoutedModel

    return RoutedModel.from_pretrained(tiny_dirs[request.param])


@pytest.fixture(scope="session")
def tiny_llama_ref(tiny_dirs):
    from ftp_vllm.reference import RoutedModel

    return RoutedModel.from_pretrained(tiny_dirs["llama"])


def packed_batch(lengths, vocab=1000, seed=0):
    """Random token ids for requests of `lengths`, packed, with their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return torch.randint(3, vocab, (int(cu[-1]),), generator=g), cu


def calibrated_router(model, sparsity, lengths=(40, 40), prompt_lens=None, decode_sparsity=None, seed=0,
                      min_prompt=0):
    """A router (random MLP) with calibrated inputs and thresholds on random text; it routes
    prompts of any length unless `min_prompt` says otherwise (the tiny tests use short ones)."""
    from ftp_vllm.reference import calibrate_router_inputs, calibrate_router_thresholds

    torch.manual_seed(seed)
    router = model.new_router(min_prompt=min_prompt)
    router.set_schedule(sparsity, decode_sparsity)
    ids, cu = packed_batch(lengths, seed=seed)
    calibrate_router_inputs(model, router, ids, cu)
    out = calibrate_router_thresholds(model, router, ids, cu, prompt_lens)
    return router, ids, cu, out


def save_changed_router(router, config: dict, out) -> str:
    """Save a loaded router changed by a test, with its checkpoint's settings."""
    from ftp_vllm.checkpoint import save_checkpoint

    config = {k: v for k, v in config.items() if k not in ("schema_version", "router", "schedule")}
    return str(save_checkpoint(out, router, config))


def decode_routed_router(out) -> str:
    """The shipped 30% router with decode tokens routed too (its prompt schedule and
    thresholds), so that preemption has decode-token decisions to recompute."""
    from ftp_vllm.checkpoint import load_checkpoint

    router, config = load_checkpoint("smollm2-135m-instruct-s30")
    router.set_schedule(router.sparsity.tolist(), router.sparsity.tolist())
    router.threshold_decode.copy_(router.threshold_prompt)
    return save_changed_router(router, config, out)
