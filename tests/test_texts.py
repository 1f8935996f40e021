import pytest
import torch

from ftp_vllm import texts


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ftp_vllm.model_store import prepare_tokenizer

    return AutoTokenizer.from_pretrained(prepare_tokenizer())


def test_splits_are_disjoint_real_text():
    cal, ev = texts.documents("calibration"), texts.documents("evaluation")
    assert len(cal) > 50 and len(ev) > 50
    assert sum(map(len, cal)) > 200_000 and sum(map(len, ev)) > 200_000
    assert not set(cal) & set(ev)
    # no evaluation paragraph appears inside calibration text
    cal_text = "\n".join(cal)
    paragraphs = [p for d in ev for p in d.split("\n\n") if len(p) > 200]
    assert paragraphs and not any(p in cal_text for p in paragraphs[::10])


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown text split"):
        texts.documents("training")


def test_chunks_deterministic_fixed_length(tokenizer):
    a = texts.token_chunks(tokenizer, "evaluation", length=64, limit=12)
    b = texts.token_chunks(tokenizer, "evaluation", length=64, limit=12)
    assert a.shape == (12, 64) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, texts.token_chunks(tokenizer, "evaluation", length=64, limit=12, seed=1))
    with pytest.raises(ValueError, match="fewer than"):
        texts.token_chunks(tokenizer, "evaluation", length=4096, limit=10_000)
