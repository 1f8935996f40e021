import os

import pytest
import torch

os.environ.setdefault("FTP_VLLM_HOME", "/tmp/ftphome")
# Tiny matmuls gain nothing from threads, and on a shared machine waking a pool costs ~10 ms each.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    from ftp_vllm.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request, tiny_dirs):
    from ftp_vllm.reference import RoutedModel

    return RoutedModel.from_pretrained(tiny_dirs[request.param])


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    from ftp_vllm.reference import RoutedModel

    return RoutedModel.from_pretrained(tiny_dirs["llama"])


def packed_batch(lengths, vocab=1000, seed=0):
    """Random token ids for requests of `lengths`, packed, with their cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    return torch.randint(3, vocab, (int(cu[-1]),), generator=g), cu


def calibrated_router(model, sparsity, lengths=(40, 40), prompt_lens=None, decode_sparsity=None, seed=0):
    """A router (random MLP) with calibrated inputs and thresholds on random text."""
    from ftp_vllm.reference import calibrate_router_inputs, calibrate_router_thresholds

    torch.manual_seed(seed)
    router = model.new_router()
    router.set_schedule(sparsity, decode_sparsity)
    ids, cu = packed_batch(lengths, seed=seed)
    calibrate_router_inputs(model, router, ids, cu)
    out = calibrate_router_thresholds(model, router, ids, cu, prompt_lens)
    return router, ids, cu, out
