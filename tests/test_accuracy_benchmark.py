import json

import pytest
import torch
import torch.nn.functional as F

from ftp_vllm import baselines as B
from ftp_vllm import evaluation as E
from ftp_vllm.reference import is_prompt
from ftp_vllm.router import Router
from tests.conftest import calibrated_router, load_benchmark

PROSE = [
    "Rivers carry water from hills to the sea. Their banks hold towns and farms. Floods bring soil that feeds "
    "the fields each spring. Bridges join the two sides where the water runs slow and wide.",
    "Bread is made from flour, water and salt. Yeast makes the dough rise. Bakers shape loaves before dawn. "
    "The crust turns brown in a hot oven.",
    "Stars are suns far away from us. Some of them have planets. Light from them takes years to arrive. "
    "On clear nights the sky shows thousands of them.",
    "Trains run on steel rails between cities. Stations sit at the heart of many towns. A timetable tells "
    "travellers when to board. Night trains carry sleepers across borders.",
    "Bees gather nectar from flowers. They turn it into honey inside the hive. A queen lays the eggs. "
    "Workers guard the entrance from wasps.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def tiny_router_dir(tiny_llama, tiny_llama_ref, tmp_path_factory):
    from ftp_vllm.checkpoint import fingerprint, save_checkpoint

    router, *_ = calibrated_router(tiny_llama_ref, [0.0, 0.4, 0.4, 0.0], prompt_lens=torch.tensor([30, 30]))
    config = {"base_model": {"name": "tiny", **fingerprint(tiny_llama)}, "target_sparsity": 0.2,
              "decode_target_sparsity": 0.2}
    return save_checkpoint(tmp_path_factory.mktemp("router") / "tiny-s20", router, config)


def test_cloze_items_deterministic_and_distractors_from_other_documents(tokenizer):
    a = E.cloze_items(tokenizer, PROSE, 12, seed=3, context_tokens=16, candidate_tokens=6)
    b = E.cloze_items(tokenizer, PROSE, 12, seed=3, context_tokens=16, candidate_tokens=6)
    assert [(i.context, i.candidates, i.answer) for i in a] == [(i.context, i.candidates, i.answer) for i in b]
    assert len(a) == 12 and len({i.answer for i in a}) > 1
    for item in a:
        assert item.document not in item.distractor_documents
        assert len(set(item.distractor_documents)) == E.CHOICES - 1
        assert len(item.candidates) == E.CHOICES and len(item.context) <= 16
        assert all(1 <= len(c) <= 6 for c in item.candidates)
        true = item.candidates[item.answer]
        assert sum(c == true for c in item.candidates) == 1
    other = E.cloze_items(tokenizer, PROSE, 12, seed=4, context_tokens=16, candidate_tokens=6)
    assert [i.candidates for i in other] != [i.candidates for i in a]


def test_sentences_drop_code_and_headings():
    doc = "Title\n*****\n\nFirst one. Second one here.\n\n   code = 1\n   more()\n\nThird? Yes."
    assert E.sentences(doc) == ["First one.", "Second one here.", "Third?", "Yes."]


def test_skip_counter_on_known_mask():
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)  # 2 blocks x 4 tokens
    prompt = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    c = E.SkipCounter()
    c.add(keep, prompt)
    assert c.share("prompt") == 3 / 6 and c.share("decode") == 1 / 2 and c.share() == 4 / 8
    c.add(torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    assert c.share("decode") == 1 / 6 and c.share() == 4 / 12
    both = c + c
    assert both.total == {"prompt": 12, "decode": 12} and both.share() == c.share()
    c.add(keep, prompt, routed=torch.tensor([0, 1, 1, 0], dtype=torch.bool))  # token 0's prompt ran dense
    assert c.share(E.ROUTED) == 2 / 4 and c.share("prompt") == 6 / 12 and c.share() == 8 / 20
    assert (c + c).total[E.ROUTED] == 8


def test_routed_prompt_leaves_out_prompts_below_min_prompt():
    router = Router(3, 1, 4, min_prompt=4)
    cu, prompt_lens = torch.tensor([0, 5, 8, 14]), torch.tensor([3, 3, 5])  # 5 and 8 tokens in; 3 dense
    routed = E.Method("ftp", router=router).routed_prompt(cu, prompt_lens)
    assert routed.tolist() == [0] * 8 + [1] * 5 + [0]
    assert E.Method("shortgpt").routed_prompt(cu, prompt_lens).tolist() == is_prompt(cu, prompt_lens).tolist()


def test_branches_equal_one_pass_per_candidate(tiny_llama_ref):
    model = tiny_llama_ref
    router, *_ = calibrated_router(model, [0.0, 0.4, 0.5, 0.3], prompt_lens=torch.tensor([30, 30]),
                                   decode_sparsity=[0.0, 0.4, 0.5, 0.3])
    contexts = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24], [7] * 12]
    branches = [[1, 2, 3, 4], [4, 5, 6, 7, 8], [9], [10, 11, 12]]
    owner = torch.tensor([0, 0, 1, 2])
    ci, cc = E._pack(contexts)
    bi, bc = E._pack(branches)
    methods = [E.Method("dense"), E.Method("ftp", router=router),
               E.Method("static", keep_rule=B.static_rule([0.0, 0.5, 0.5, 0.0])),
               E.Method("shortgpt", keep_rule=B.shortgpt_rule(4, [1, 2])),
               E.Method("shortgpt-prompt", keep_rule=B.shortgpt_prompt_rule(4, [1, 2]))]
    for method in methods:
        counter = E.SkipCounter()
        got = E.branch_logprobs(model, method, ci, cc, bi, bc, owner, counter)
        want = []
        for n, branch in enumerate(branches):
            ctx = contexts[owner[n]]
            ids, cu, pl = torch.tensor(ctx + branch), torch.tensor([0, len(ctx) + len(branch)]), torch.tensor([len(ctx)])
            with torch.inference_mode():
                lp = F.log_softmax(model(ids, cu, pl, keep=method.policy(cu, pl)).logits, -1)
            want.append(sum(lp[len(ctx) - 1 + t, tok] for t, tok in enumerate(branch)))
        torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-5)
        if method.method == "ftp":
            assert counter.share("decode") > 0  # decode tokens were routed, not just kept


def test_shortgpt_prompt_rule_drops_blocks_for_prompt_tokens_only():
    cu, prompt_lens = torch.tensor([0, 10, 16]), torch.tensor([7, 6])
    keep = B.shortgpt_prompt_rule(4, [1, 3])(cu, prompt_lens)
    prompt = is_prompt(cu, prompt_lens)
    assert keep[[0, 2]].all()
    assert torch.equal(keep[1], ~prompt) and torch.equal(keep[3], ~prompt)


def test_static_rule_serves_prompts_below_min_prompt_dense():
    cu, prompt_lens = torch.tensor([0, 10, 30]), torch.tensor([6, 16])  # a 6-token prompt, a 16-token one
    keep = B.static_rule([0.0, 0.5], min_prompt=8)(cu, prompt_lens)
    assert keep[0].all() and keep[1, :10].all()
    assert torch.equal(keep[1, 10:], B.static_keep(cu, [0.0, 0.5], prompt_lens)[1, 10:])
    assert not keep[1, 11:18].any()
    method = E.Method("static", "r", keep_rule=B.static_rule([0.0, 0.5], 8), min_prompt=8)
    assert method.routed_prompt(cu, prompt_lens).tolist() == [False] * 10 + [True] * 16 + [False] * 4


def test_random_rule_routes_decode_tokens_deterministically():
    cu, prompt_lens = torch.tensor([0, 40, 80]), torch.tensor([30, 30])
    a = B.random_rule([0.0, 0.5], [0.0, 0.5], seed=1)(cu, prompt_lens)
    b = B.random_rule([0.0, 0.5], [0.0, 0.5], seed=1)(cu, prompt_lens)
    assert torch.equal(a, b) and a[0].all()
    decode = ~is_prompt(cu, prompt_lens)
    assert 0 < (~a[1][decode]).float().mean() < 1
    assert (~a[1][~decode]).float().mean() == pytest.approx(0.5, abs=0.05)


def test_wilson_interval_and_retention():
    lo, hi = E.wilson_interval(650, 1000)
    assert lo < 0.65 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.65 * 0.35 / 1000) ** 0.5, rel=0.01)
    assert E.retention(0.6, 0.6) == 1.0 and E.retention(0.25, 0.6, E.CHANCE) == 0.0


def test_paired_retention_interval_counts_only_disagreements():
    dense = torch.arange(1000) % 10 < 6  # 60% right
    assert E.paired_retention_interval(dense, dense) == (1.0, 1.0)
    pruned = dense.clone()
    pruned[torch.arange(0, 1000, 50)] = False  # 20 of the dense model's right answers lost: retention 0.967
    lo, hi = E.paired_retention_interval(pruned, dense)
    assert lo < E.retention(0.58, 0.6) < hi < 1.0
    wilson = E.wilson_interval(580, 1000)
    assert hi - lo < (wilson[1] - wilson[0]) / 0.6 / 2  # far narrower than unpaired intervals
    assert E.paired_retention_interval(pruned, dense, seed=1) != (lo, hi)


def test_benchmark_on_a_text_file(tiny_llama, tiny_router_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(PROSE) + "\n")
    out = tmp_path / "acc.json"
    bench = load_benchmark("accuracy")
    bench.main(["--model", tiny_llama, "--routers", str(tiny_router_dir), "--sparsities", "0.25", "--text", str(text),
                "--items", "10", "--chunks", "2", "--context", "24", "--continuation", "8", "--cloze-context", "16",
                "--cloze-candidate", "6", "--calib-chunks", "1", "--batch-items", "4", "--batch-chunks", "1",
                "--json", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert [r["method"] for r in rows] == ["dense", "ftp", "static", "shortgpt", "shortgpt-prompt", "static-uniform",
                                           "random", "shortgpt", "shortgpt-prompt", "static-uniform", "random"]
    for r in rows:
        for key in ("method", "router", "sparsity", "ppl", "ppl_ratio", "top1_agreement", "kl", "cloze_acc",
                    "cloze_retention", "sparsity_prompt", "sparsity_decode", "full_seq_ppl", "cloze_ci95",
                    "sparsity_continuation", "sparsity_cloze", "sparsity_prompt_routed"):
            assert key in r, key
        assert isinstance(r["sparsity"], float) and r["cloze_items"] == 10
        assert len(r["cloze_correct"]) == 10 and r["cloze_correct"].count("1") == round(10 * r["cloze_acc"])
        lo, hi = r["cloze_retention_ci95_paired"]
        assert lo <= r["cloze_retention"] <= hi
    dense, ftp = rows[0], rows[1]
    assert dense["router"] is None and dense["sparsity"] == 0.0
    assert dense["ppl_ratio"] == 1.0 and dense["cloze_retention"] == 1.0 and dense["top1_agreement"] == 1.0
    assert dense["kl"] == pytest.approx(0.0, abs=1e-6) and dense["cloze_retention_ci95_paired"] == [1.0, 1.0]
    assert ftp["router"] == "tiny-s20" and ftp["sparsity_prompt"] > 0 and "sparsity_within_1pt" in ftp
    assert ftp["sparsity_prompt_routed"] >= ftp["sparsity_prompt"]  # dense short prompts only dilute the share
    static = rows[2]  # the static rule on the router's schedule: its declared prompt share, decode dense
    assert static["router"] == "tiny-s20" and static["sparsity_decode"] == 0.0
    assert static["sparsity_prompt_continuation"] == pytest.approx(static["declared_sparsity"], abs=0.02)
    assert rows[3]["dropped_blocks"] and rows[3]["sparsity"] == pytest.approx(len(rows[3]["dropped_blocks"]) / 4)
    prompt_only = rows[4]  # the same kind of blocks, skipped by prompt tokens only, matched on the prompt share
    assert prompt_only["sparsity_decode"] == 0.0 and prompt_only["dropped_blocks"]
    assert prompt_only["sparsity_prompt"] == pytest.approx(len(prompt_only["dropped_blocks"]) / 4)
    assert prompt_only["matched_sparsity"] == pytest.approx(ftp["sparsity_prompt"], abs=1e-4)
    assert rows[5]["sparsity_decode"] == 0.0  # the static router keeps the most recent token
    assert "python benchmarks/accuracy.py" in report["setup"]["command"]
