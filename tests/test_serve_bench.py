"""The serving benchmark (`benchmarks/serve_bench.py`) without a server: the runs it plans, the
prompts each gets (its own, of the workload's lengths, in the chat template where the workload
says), datasets and commands that `vllm bench serve` itself accepts, and the summary it makes
of `vllm bench serve` results."""

import json
import math

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def sb():
    return load_benchmark("serve_bench")


@pytest.fixture(scope="module")
def tokenizer(real_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model)


@pytest.fixture(scope="module")
def planned(sb, tokenizer):
    runs = sb.plan_runs(["long-context", "chat", "multi-turn"], sb.workloads(0.15), rounds=2, requests=3,
                        capacity_rates=[0.1, 0.2])
    sb.fill_prompts(runs, tokenizer)
    return runs


def test_rounds_alternate_abba_and_every_server_runs_each_workload(sb):
    assert [sb.abba(r) for r in range(4)] == [("stock", "ftp"), ("ftp", "stock"), ("stock", "ftp"), ("ftp", "stock")]
    runs = sb.plan_runs(["long-context", "chat"], sb.workloads(0.15), rounds=4, requests=5, capacity_rates=None)
    warm = [(r.server, r.workload.name) for r in runs if r.kind == "warm-up"]
    assert warm == [("stock", "long-context"), ("stock", "chat"), ("ftp", "long-context"), ("ftp", "chat")]
    rounds = [(r.round, r.workload.name, r.server) for r in runs if r.kind == "round"]
    assert rounds == [(r, w, s) for r in range(4) for w in ("long-context", "chat") for s in sb.abba(r)]
    assert runs[-1].kind == "round" and all(r.prompt_count == 5 for r in runs if r.kind == "round")


def test_capacity_ladder_starts_unloaded_on_stock_then_climbs_in_abba_order(sb):
    runs = sb.plan_runs(["chat"], sb.workloads(0.15), rounds=1, requests=4, capacity_rates=[0.1, 0.2, 0.3])
    ladder = [(r.kind, r.server, r.request_rate, r.max_concurrency) for r in runs if r.kind in ("unloaded", "capacity")]
    assert ladder == [("unloaded", "stock", math.inf, 1),
                      ("capacity", "stock", 0.1, None), ("capacity", "ftp", 0.1, None),
                      ("capacity", "ftp", 0.2, None), ("capacity", "stock", 0.2, None),
                      ("capacity", "stock", 0.3, None), ("capacity", "ftp", 0.3, None)]
    assert len({r.name for r in runs}) == len(runs)


def test_no_prompt_is_used_by_two_runs(sb, planned, tokenizer):
    prompts = [p for r in planned for p in r.prompts]
    assert len(prompts) == len(set(prompts)) == sum(r.prompt_count for r in planned)
    # Long prompts start at offsets of their own, so none shares a prefix-cache block with another.
    long = [p for r in planned if r.workload.name == "long-context" for p in r.prompts]
    starts = [tuple(tokenizer(p, add_special_tokens=False)["input_ids"][:16]) for p in long]
    assert len(set(starts)) == len(long)
    systems = [{p.split("<|im_start|>user")[0] for p in r.prompts} for r in planned if r.workload.name == "multi-turn"]
    assert all(len(s) == 1 for s in systems), "a multi-turn run shares one system prompt"
    assert len(set.union(*systems)) == len(systems), "each multi-turn run has its own system prompt"


def test_prompts_have_the_workloads_lengths_and_template(sb, planned, tokenizer):
    for run in planned:
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in run.prompts]
        if run.workload.name == "long-context":
            assert all(1000 <= n <= 1400 for n in lengths) and not any("<|im_start|>" in p for p in run.prompts)
            continue
        for prompt in run.prompts:
            assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
            user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            assert sb.CHAT_WORDS[0] <= len(user.split()) <= sb.CHAT_WORDS[1]
        if run.workload.name == "multi-turn":
            system = run.prompts[0].split("<|im_start|>system\n")[1].split("<|im_end|>")[0]
            assert len(system.split()) == sb.SYSTEM_WORDS and min(lengths) > 250


def test_vllm_bench_serve_reads_the_dataset_and_accepts_the_command(sb, planned, tokenizer, real_model, tmp_path):
    from vllm.benchmarks.datasets import CustomDataset
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for run in (next(r for r in planned if r.workload.name == w) for w in ("long-context", "chat")):
        path = sb.write_dataset(run, tmp_path)
        assert [json.loads(line)["output_tokens"] for line in path.read_text().splitlines()] == \
            [run.workload.output_len] * len(run.prompts)
        cmd = sb.bench_command(run, "http://127.0.0.1:1", "smollm2-135m-instruct", real_model, path, tmp_path, 7)
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(cmd[3:])
        assert (args.dataset_name, args.skip_chat_template, args.ignore_eos, args.custom_output_len) == \
            ("custom", True, True, -1)
        assert args.request_rate == run.request_rate and args.max_concurrency == run.max_concurrency
        assert args.percentile_metrics == "ttft,tpot,itl,e2el" and args.metric_percentiles == "50,90,99"
        dataset = CustomDataset(dataset_path=str(path), disable_shuffle=args.disable_shuffle, random_seed=args.seed)
        samples = dataset.sample(tokenizer=tokenizer, num_requests=args.num_prompts,
                                 output_len=args.custom_output_len, skip_chat_template=args.skip_chat_template)
        assert [s.prompt for s in samples] == run.prompts, "sent as written, in order, template not applied twice"
        assert {s.expected_output_len for s in samples} == {run.workload.output_len}


def fake_result(ttft, tpot, throughput, failed=0):
    """What `vllm bench serve --save-result` writes, with the fields the benchmark reads."""
    result = {"completed": 4 - failed, "failed": failed, "duration": 10.0, "request_throughput": 0.4,
              "output_throughput": throughput, "request_rate": "inf"}
    for m, base in (("ttft", ttft), ("tpot", tpot), ("itl", tpot), ("e2el", ttft + 31 * tpot)):
        result.update({f"p{p}_{m}_ms": base * (1 + p / 100) for p in (50, 90, 99)})
    return result


def record(sb, server, round_, result, kind="round", workload="chat"):
    return {"name": f"{workload}-{round_}-{server}", "server": server, "workload": workload, "kind": kind,
            "round": round_, "metrics": sb.run_metrics(result), "raw": result}


def test_summary_takes_medians_over_rounds_and_pairs_ratios_by_round(sb, tmp_path):
    records = [record(sb, "stock", None, fake_result(9999, 9999, 1), kind="warm-up"),
               record(sb, "stock", 0, fake_result(100, 10, 50)), record(sb, "ftp", 0, fake_result(80, 10, 55)),
               record(sb, "ftp", 1, fake_result(90, 12, 40)), record(sb, "stock", 1, fake_result(100, 10, 50)),
               record(sb, "stock", 2, fake_result(200, 20, 25)),
               record(sb, "ftp", 2, fake_result(100, 10, 50, failed=1))]
    summary = sb.summarise(records)
    assert list(summary) == ["chat"]
    stock, ftp = summary["chat"]["servers"]["stock"], summary["chat"]["servers"]["ftp"]
    assert stock["rounds"] == ftp["rounds"] == 3 and (stock["failed"], ftp["failed"]) == (0, 1)
    assert stock["ttft_p50_ms"] == pytest.approx(150) and ftp["ttft_p50_ms"] == pytest.approx(135)
    assert stock["ttft_p90_ms"] == pytest.approx(190) and ftp["output_throughput"] == 50
    ratios = summary["chat"]["ftp_over_stock"]
    assert ratios["ttft_p50_ms"]["by_round"] == pytest.approx([0.8, 0.9, 0.5])
    assert ratios["ttft_p50_ms"]["median"] == pytest.approx(0.8)
    assert ratios["tpot_p50_ms"]["by_round"] == pytest.approx([1.0, 1.2, 0.5])
    assert ratios["output_throughput"]["by_round"] == pytest.approx([1.1, 0.8, 2.0])
    assert ratios["output_throughput"]["median"] == pytest.approx(1.1)
    sb.print_summary(summary, None)
    sb.plot_ratios(summary, tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_capacity_is_the_last_rate_before_the_first_miss(sb):
    assert sb.capacity({0.1: 100, 0.2: 200, 0.3: 400, 0.4: 100}, bound=300) == 0.2
    assert sb.capacity({0.2: 300, 0.1: 100}, bound=300) == 0.1
    assert sb.capacity({0.1: None, 0.2: 10}, bound=300) is None  # failed requests at the lowest rate
    assert sb.capacity({}, bound=300) is None


def test_capacity_ladder_stops_climbing_for_a_server_that_missed(sb):
    runs = sb.plan_runs(["long-context"], sb.workloads(0.15), rounds=1, requests=2, capacity_rates=[0.1, 0.2, 0.3])
    ttft_p90 = {("stock", 0.1): 100, ("stock", 0.2): 250, ("stock", 0.3): 500,
                ("ftp", 0.1): 100, ("ftp", 0.2): 460, ("ftp", 0.3): 100}

    class FakeSession:
        measured = []

        def measure(self, run):
            self.measured.append((run.server, run.request_rate))
            if run.kind == "unloaded":
                return record(sb, "stock", None, fake_result(100, 10, 50), kind="unloaded")
            result = fake_result(100, 10, 50)
            result["p90_ttft_ms"] = ttft_p90[run.server, run.request_rate]
            return record(sb, run.server, run.round, result, kind="capacity")

    session = FakeSession()
    cap = sb.run_capacity_ladder(session, runs, [0.1, 0.2, 0.3])
    assert ("ftp", 0.3) not in session.measured and ("stock", 0.3) in session.measured
    assert cap["ttft_p90_bound_ms"] == pytest.approx(450)  # 3x the unloaded p50 (the fake's p50 is 150)
    assert cap["capacity_rps"] == {"stock": 0.2, "ftp": 0.1} and cap["ftp_over_stock"] == pytest.approx(0.5)
