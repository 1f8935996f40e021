import json
import shutil

import pytest
import torch

from ftp_vllm.checkpoint import (
    CONFIG_FILE, ROUTER_FILE, SHIPPED, CheckpointError, check_compatible, fingerprint, load_checkpoint, resolve_router,
    save_checkpoint,
)

from ftp_vllm.router import Router

from .conftest import calibrated_router


@pytest.fixture
def saved(tmp_path, tiny_llama, tiny_llama_ref):
    router, *_ = calibrated_router(tiny_llama_ref, [0.0, 0.3, 0.5, 0.0], decode_sparsity=[0.0, 0.2, 0.4, 0.0])
    router.threshold_prompt[0], router.threshold_prompt[3] = float("-inf"), float("inf")  # both occur in real ones
    folder = save_checkpoint(tmp_path / "ckpt", router, {"base_model": fingerprint(tiny_llama), "note": "test"})
    return folder, router


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_round_trip_with_infinite_thresholds(saved, tiny_llama):
    folder, router = saved
    loaded, config = load_checkpoint(folder)
    for key, value in router.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.threshold_prompt[0] == float("-inf") and loaded.threshold_prompt[3] == float("inf")
    assert loaded.is_dense(0) and not loaded.is_dense(1)
    assert config["note"] == "test" and config["schedule"]["threshold_prompt"][3] == "inf"
    check_compatible(config, tiny_llama)


def test_fingerprint_is_deterministic_and_sees_weights(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    assert fingerprint(copy) == fingerprint(tiny_llama)  # the same files elsewhere
    state = load_file(str(copy / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0  # a sampled element: the first of the tensor
    save_file(state, str(copy / "model.safetensors"))
    assert fingerprint(copy)["weights_sha256"] != fingerprint(tiny_llama)["weights_sha256"]


def test_other_base_model_named(saved, tiny_qwen2):
    folder, _ = saved
    _, config = load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="architecture: router 'LlamaForCausalLM', model 'Qwen2ForCausalLM'.*weights_sha256"):
        check_compatible(config, tiny_qwen2)


def test_missing_folder_and_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no shipped router named 'nosuch-router'"):
        load_checkpoint("nosuch-router")
    folder, _ = saved
    (folder / ROUTER_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"missing {ROUTER_FILE}"):
        load_checkpoint(folder)


def test_unreadable_json_and_schema(saved):
    folder, _ = saved
    edit_config(folder, schema_version=99)
    with pytest.raises(CheckpointError, match="schema version 99"):
        load_checkpoint(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: unreadable JSON"):
        load_checkpoint(folder)


def test_wrong_layer_count_and_shapes(saved):
    folder, _ = saved
    config = json.loads((folder / CONFIG_FILE).read_text())
    edit_config(folder, base_model={**config["base_model"], "num_layers": 30})
    with pytest.raises(CheckpointError, match="4 blocks, its base model 30 layers"):
        load_checkpoint(folder)
    edit_config(folder, base_model=config["base_model"], router={**config["router"], "hidden": 32})
    with pytest.raises(CheckpointError, match=r"wrong tensors \(mlp.fc1.weight: \[64, 4\], expected \[32, 4\]"):
        load_checkpoint(folder)


def test_non_finite_mlp_weights_rejected(saved):
    from safetensors.torch import load_file, save_file

    folder, _ = saved
    state = load_file(str(folder / ROUTER_FILE))
    state["mlp.fc2.bias"][0] = float("nan")
    save_file(state, str(folder / ROUTER_FILE))
    with pytest.raises(CheckpointError, match="non-finite values in mlp.fc2.bias"):
        load_checkpoint(folder)
    (folder / ROUTER_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(folder)


def test_resolve_router_paths(saved):
    folder, _ = saved
    assert resolve_router(str(folder)) == folder


SHIPPED_ROUTERS = sorted(p.name for p in SHIPPED.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def real_reference(real_model):
    from transformers import AutoTokenizer

    from ftp_vllm.reference import RoutedModel

    return RoutedModel.from_pretrained(real_model), AutoTokenizer.from_pretrained(real_model)


def test_routers_ship_with_the_package():
    assert len(SHIPPED_ROUTERS) >= 3, SHIPPED_ROUTERS


@pytest.mark.parametrize("name", SHIPPED_ROUTERS)
def test_shipped_routers_realise_their_targets_on_held_out_text(name, real_model, real_reference):
    """Measured, not read back: the served keep rule on held-out prose skips the router's declared
    share of routed prompt work, at the training length and at the shortest routed length."""
    from ftp_vllm.evaluation import SkipCounter
    from ftp_vllm.reference import Served, prompt_windows
    from ftp_vllm.texts import token_chunks

    model, tokenizer = real_reference
    router, config = load_checkpoint(name)
    check_compatible(config, real_model)  # the shipped model, built by the fixture: never skipped
    assert abs(router.sparsity.mean().item() - config["target_sparsity"]) < 1e-6
    prompts = token_chunks(tokenizer, "evaluation", router.threshold_length, limit=2)
    for length, tolerance in ((router.threshold_length, 0.02), (router.min_prompt, 0.04)):
        ids, cu, prompt_lens = prompt_windows(prompts, length)
        with torch.no_grad():
            keep = model(ids, cu, prompt_lens, keep=Served(router)).keep
        realised = SkipCounter.of(keep, torch.ones(keep.shape[1], dtype=torch.bool)).share("prompt")
        assert abs(realised - config["target_sparsity"]) < tolerance, (length, realised)
    with torch.no_grad():  # shorter prompts run dense
        ids, cu, prompt_lens = prompt_windows(prompts, router.min_prompt - 1)
        assert model(ids, cu, prompt_lens, keep=Served(router)).keep.all()


def test_short_prompt_thresholds_round_trip_and_older_checkpoints_load(saved, tiny_llama, tmp_path):
    folder, router = saved
    short = Router(router.num_blocks, router.mean_query.shape[1], router.mean_query.shape[2], min_prompt=0,
                   short_lengths=[8, 16], threshold_length=40)
    state = router.state_dict()
    state["threshold_short"] = torch.tensor([[0.5, 1.5]] * router.num_blocks)
    short.load_state_dict(state)
    loaded, config = load_checkpoint(save_checkpoint(tmp_path / "short", short, {"base_model": fingerprint(tiny_llama)}))
    assert loaded.short_lengths == [8, 16] and loaded.threshold_length == 40
    assert torch.equal(loaded.threshold_short, short.threshold_short)
    assert config["router"]["short_prompt_lengths"] == [8, 16] and config["schedule"]["threshold_short"][1] == [0.5, 1.5]
    # a checkpoint written before short-prompt thresholds existed: no such tensor or fields
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / ROUTER_FILE))
    del state["threshold_short"]
    save_file(state, str(folder / ROUTER_FILE))
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["router"]["short_prompt_lengths"], config["router"]["threshold_length"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    old, _ = load_checkpoint(folder)
    assert old.short_lengths == [] and torch.equal(old.threshold_prompt, router.threshold_prompt)
    edit_config(folder, router={**config["router"], "short_prompt_lengths": [16, 8], "threshold_length": 40})
    with pytest.raises(CheckpointError, match="must rise"):
        load_checkpoint(folder)
