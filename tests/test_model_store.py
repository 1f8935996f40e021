import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftp_vllm import model_store
from ftp_vllm.model_store import DEFAULT_MODEL, ModelError, prepare_model, resolve_model, verify

ROOT = Path(__file__).resolve().parents[1]


def test_real_model_folder_is_complete_and_reused(real_model):
    folder = Path(real_model)
    assert verify(folder, DEFAULT_MODEL) == folder
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and "_name_or_path" not in config
    weights = folder / model_store.WEIGHTS_FILE
    before = weights.stat().st_mtime_ns
    assert prepare_model() == folder  # verified, not rebuilt
    assert weights.stat().st_mtime_ns == before


def test_real_model_answers_a_question(real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model)
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _broken_copy(real_model: str, dest: Path, weights: bytes) -> Path:
    dest.mkdir()
    for f in Path(real_model).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)
    (dest / model_store.WEIGHTS_FILE).write_bytes(weights)
    return dest


def test_truncated_weights_are_reported_with_path_and_fix(real_model, tmp_path):
    head = (Path(real_model) / model_store.WEIGHTS_FILE).open("rb").read(4096)
    folder = _broken_copy(real_model, tmp_path / "broken", head)
    with pytest.raises(ModelError) as e:
        verify(folder, DEFAULT_MODEL)
    assert str(folder) in str(e.value) and "prepare-model" in str(e.value)


def test_manifest_mismatch_is_reported(tiny_llama):
    with pytest.raises(ModelError, match="does not match the manifest.*missing"):
        verify(Path(tiny_llama), DEFAULT_MODEL)


def test_missing_folder_and_hub_ids(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_killed_or_bad_conversion_leaves_nothing_behind(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("FTP_VLLM_HOME", str(tmp_path))
    target = model_store.model_dir(DEFAULT_MODEL)

    def killed(model, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_store, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_model()
    assert not target.exists() and list(target.parent.iterdir()) == []

    def wrong_model(model, out):
        shutil.copytree(tiny_llama, out, dirs_exist_ok=True)

    monkeypatch.setattr(model_store, "_convert", wrong_model)
    with pytest.raises(ModelError, match="manifest"):
        prepare_model()
    assert not target.exists() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize("model", ["/no/such/model-folder", "broken"])
def test_launcher_bad_model_is_one_clear_line(model, tmp_path):
    if model == "broken":
        model = str(tmp_path)
        (tmp_path / "config.json").write_text("not json")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "serving" / "launch.py"), "--model", model],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert model in lines[0] and "launch: error:" in lines[0]


def test_pruned_model_equals_dropping_blocks_in_the_reference(tiny_llama, tiny_llama_ref, tmp_path):
    """ShortGPT's pruned folder computes what the reference does with those blocks skipped."""
    import torch

    from ftp_vllm.baselines import shortgpt_keep
    from ftp_vllm.model_store import write_pruned_model
    from ftp_vllm.reference import GivenMasks, RoutedModel

    from .conftest import packed_batch

    pruned = RoutedModel.from_pretrained(write_pruned_model(tiny_llama, [1, 2], tmp_path / "pruned"))
    assert pruned.num_blocks == 2
    ids, cu = packed_batch([20, 11])
    expected = tiny_llama_ref(ids, cu, keep=GivenMasks(shortgpt_keep(4, len(ids), [1, 2]))).logits
    torch.testing.assert_close(pruned(ids, cu).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "pruned" / "tokenizer.json").exists() or (tmp_path / "pruned" / "tokenizer_config.json").exists()
