"""Serving latency and throughput, stock vLLM vs FTP, measured by `vllm bench serve`.

    python benchmarks/serve_bench.py --json results/serve_bench.json

Starts two servers with the same settings, both alive at once: `vllm serve
MODEL` and `vllm serve MODEL --ftp-router ROUTER` (vLLM's defaults otherwise:
compiled mode, prefix caching on; extra arguments go to both).  Each run is one
`vllm bench serve` subprocess (`--backend vllm`, `--ignore-eos`, greedy) on a
custom dataset of held-out text (`texts.documents("evaluation")`):

  long-context   ~1,300-token prompts, 32 output tokens, Poisson arrivals at
                 `--long-context-rate` (0.15 req/s): prefill dominates
  chat           30-120-word prompts in the model's chat template, 128 output
                 tokens, at most 8 requests in flight
  multi-turn     one system prompt (~200 words) shared by the run's requests,
                 each with its own 30-120-word user turn, chat template, 64
                 output tokens, at most 8 in flight

Every run gets prompts of its own (long-context windows start at offsets of
their own, overlapping when the text runs short), so the prefix cache, which
matches from a prompt's first token, never hides a prefill.  After a warm-up
run per server and workload, `--rounds` rounds run in ABBA order (stock first
in even rounds, FTP first in odd ones), one server loaded at a time; both
servers of a round get the same arrival times.
Reports, per workload, each server's medians over rounds of TTFT, TPOT, ITL and
end-to-end latency (p50, p90), output and request throughput, and the per-round
paired ratios FTP / stock of TTFT p50, TPOT p50 and output throughput with
their median: a machine that drifts between rounds moves both servers of a
pair.  `--capacity` also climbs a ladder of long-context rates
(`--capacity-rates`): each server's capacity is the highest rate up to which
it kept TTFT p90 under 3x stock's unloaded TTFT p50 (one request in flight).
`--json OUT` writes everything (commands, per-run metrics and raw results) and
a plot of the paired ratios by round next to it (`--plot` to choose).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

SERVERS = ("stock", "ftp")
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)
SUMMARY_FIELDS = tuple(f"{m}_p{p}_ms" for m in METRICS for p in (50, 90)) + ("output_throughput", "request_throughput")
RATIO_FIELDS = ("ttft_p50_ms", "tpot_p50_ms", "output_throughput")
LONG_PROMPT_TOKENS = 1300
CHAT_WORDS = (30, 120)
SYSTEM_WORDS = 200
WARMUP_PROMPTS = 2
CAPACITY_BOUND = 3.0  # times stock's unloaded TTFT p50
RUN_TIMEOUT_S = 3 * 3600


class BenchError(RuntimeError):
    """A server or a `vllm bench serve` run failed; the message names its log."""


@dataclass(frozen=True)
class Workload:
    name: str
    output_len: int
    request_rate: float = math.inf  # inf: all requests at once, `max_concurrency` in flight
    max_concurrency: int | None = None


def rate_json(rate: float) -> float | str:
    """A request rate as `vllm bench serve` saves it: "inf" for all at once."""
    return rate if math.isfinite(rate) else "inf"


def workloads(long_context_rate: float) -> dict[str, Workload]:
    return {w.name: w for w in [Workload("long-context", 32, long_context_rate),
                                Workload("chat", 128, max_concurrency=8),
                                Workload("multi-turn", 64, max_concurrency=8)]}


@dataclass
class Run:
    """One `vllm bench serve` run: a server, a workload and the prompts only it gets."""

    server: str
    workload: Workload
    kind: str  # "warm-up", "round", "unloaded" or "capacity"
    round: int | None = None
    request_rate: float = math.inf
    max_concurrency: int | None = None
    prompt_count: int = 0
    prompts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        tag = f"r{self.round}" if self.kind == "round" else (
            f"{self.request_rate:g}rps" if self.kind == "capacity" else self.kind)
        return f"{self.workload.name}-{tag}-{self.server}"


def abba(round_: int) -> tuple[str, ...]:
    """The servers' order in a round: stock first in even rounds, FTP first in odd ones."""
    return SERVERS if round_ % 2 == 0 else SERVERS[::-1]


def plan_runs(names: list[str], all_workloads: dict[str, Workload], rounds: int, requests: int,
              capacity_rates: list[float] | None) -> list[Run]:
    """Every run this benchmark may make, in order: warm-ups, ABBA rounds, then the capacity
    ladder (stock's unloaded run, then each rate in ABBA order; a server that missed the bound at
    one rate is not run at higher ones)."""
    chosen = [all_workloads[n] for n in names]
    runs = [Run(s, w, "warm-up", max_concurrency=w.max_concurrency, prompt_count=WARMUP_PROMPTS)
            for s in SERVERS for w in chosen]
    runs += [Run(s, w, "round", r, w.request_rate, w.max_concurrency, requests)
             for r in range(rounds) for w in chosen for s in abba(r)]
    if capacity_rates:
        long = all_workloads["long-context"]
        runs.append(Run("stock", long, "unloaded", max_concurrency=1, prompt_count=requests))
        runs += [Run(s, long, "capacity", i, rate, None, requests)
                 for i, rate in enumerate(capacity_rates) for s in abba(i)]
    return runs


# --- prompts -----------------------------------------------------------------------------------

def evaluation_text() -> str:
    from ftp_vllm.texts import documents

    return "\n\n".join(documents("evaluation"))


class Words:
    """Held-out text handed out as consecutive runs of words (whitespace kept), none twice."""

    def __init__(self, text: str):
        self.words = re.findall(r"\S+\s*", text)
        self.at = 0

    def take(self, count: int) -> str:
        if self.at + count > len(self.words):
            raise BenchError(f"held-out text has {len(self.words)} words; these runs need more "
                             "(fewer --requests or --rounds)")
        piece = "".join(self.words[self.at:self.at + count]).strip()
        self.at += count
        return piece


def token_windows(tokenizer, text: str, count: int, length: int) -> list[str]:
    """`count` windows of `length` tokens of `text`, each starting at its own offset: adjacent
    when the text holds that many, else overlapping.  vLLM's prefix cache matches whole blocks
    from a prompt's first token on, so windows with different starts never hit each other's."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    stride = min(length, (len(ids) - length) // max(count - 1, 1))
    if stride < 1:
        raise BenchError(f"held-out text has {len(ids)} tokens, too few for {count} prompts of {length}")
    return [tokenizer.decode(ids[i * stride:i * stride + length]) for i in range(count)]


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """`user` (after `system`) in the model's chat template, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def fill_prompts(runs: list[Run], tokenizer, seed: int = 0) -> None:
    """Give every run its own prompts: no prompt and no multi-turn system prompt is used twice."""
    rng = random.Random(seed)
    text = evaluation_text()
    words = Words(text)
    long_runs = [r for r in runs if r.workload.name == "long-context"]
    windows = token_windows(tokenizer, text, sum(r.prompt_count for r in long_runs), LONG_PROMPT_TOKENS) \
        if long_runs else []
    for run in long_runs:
        run.prompts, windows = windows[:run.prompt_count], windows[run.prompt_count:]
    for run in runs:
        if run.workload.name == "chat":
            run.prompts = [chat_prompt(tokenizer, words.take(rng.randint(*CHAT_WORDS)))
                           for _ in range(run.prompt_count)]
        elif run.workload.name == "multi-turn":
            system = words.take(SYSTEM_WORDS)
            run.prompts = [chat_prompt(tokenizer, words.take(rng.randint(*CHAT_WORDS)), system)
                           for _ in range(run.prompt_count)]


def write_dataset(run: Run, folder: Path) -> Path:
    """The run's prompts as the JSONL file `vllm bench serve --dataset-name custom` reads."""
    path = folder / f"{run.name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_tokens": run.workload.output_len}) + "\n"
                            for p in run.prompts))
    return path


# --- running -----------------------------------------------------------------------------------

def bench_command(run: Run, base_url: str, model: str, tokenizer: str, dataset: Path, result_dir: Path,
                  seed: int) -> list[str]:
    """`vllm bench serve` for one run; prompts are sent as written (chat template already in)."""
    from ftp_vllm.server_process import vllm_executable

    cmd = [vllm_executable(), "bench", "serve", "--backend", "vllm", "--base-url", base_url,
           "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", "custom", "--dataset-path", str(dataset), "--num-prompts", str(len(run.prompts)),
           "--custom-output-len=-1", "--skip-chat-template", "--disable-shuffle",
           "--request-rate", f"{run.request_rate:g}", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
           "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(map(str, PERCENTILES)),
           "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{run.name}.json",
           "--disable-tqdm"]
    return cmd + (["--max-concurrency", str(run.max_concurrency)] if run.max_concurrency else [])


def run_bench(cmd: list[str], result_path: Path, log_path: Path) -> dict:
    """Run `vllm bench serve` and return its saved result."""
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            raise BenchError(f"vllm bench serve ran over {RUN_TIMEOUT_S} s; its log: {log_path}") from None
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"vllm bench serve failed (exit code {rc}); its log: {log_path}\n{tail}")
    return json.loads(result_path.read_text())


def run_metrics(result: dict) -> dict:
    """What this benchmark reports of one `vllm bench serve` result (times in ms)."""
    out = {k: result.get(k) for k in ("completed", "failed", "duration", "request_throughput", "output_throughput")}
    out.update({f"{m}_p{p}_ms": result.get(f"p{p}_{m}_ms") for m in METRICS for p in PERCENTILES})
    return out


def start_server(stack: ExitStack, name: str, args: list[str], log: Path):
    from ftp_vllm.server_process import vllm_server

    print(f"== starting {name}: vllm serve {' '.join(args)} (log: {log})", flush=True)
    started = time.monotonic()
    try:
        server = stack.enter_context(vllm_server(args, log))
    except RuntimeError as e:
        raise BenchError(f"the {name} server did not start; its log: {log}\n{e}") from None
    print(f"   {name} healthy after {time.monotonic() - started:.0f} s at {server.base_url}", flush=True)
    return server


def progress_line(record: dict) -> str:
    m = record["metrics"]

    def ms(key):
        return "-" if m[key] is None else f"{m[key]:.0f}"

    return (f"  {record['name']:<32} TTFT p50/p90 {ms('ttft_p50_ms')}/{ms('ttft_p90_ms')} ms  "
            f"TPOT p50 {ms('tpot_p50_ms')} ms  E2EL p50 {ms('e2el_p50_ms')} ms  "
            f"{m['output_throughput']:.1f} tok/s  failed {m['failed']}  ({record['wall_s']:.0f} s)")


@dataclass
class Session:
    """The servers and where this benchmark writes, for running one planned run after another."""

    servers: dict
    model: str
    tokenizer: str
    work: Path
    seed: int
    records: list[dict] = field(default_factory=list)

    def measure(self, run: Run) -> dict:
        dataset = write_dataset(run, self.work / "datasets")
        seed = self.seed + (run.round or 0)  # both servers of a round get the same arrival times
        cmd = bench_command(run, self.servers[run.server].base_url, self.model, self.tokenizer, dataset,
                            self.work / "results", seed)
        started = time.monotonic()
        result = run_bench(cmd, self.work / "results" / f"{run.name}.json", self.work / "logs" / f"{run.name}.log")
        record = {"name": run.name, "server": run.server, "workload": run.workload.name, "kind": run.kind,
                  "round": run.round, "request_rate": rate_json(run.request_rate),
                  "max_concurrency": run.max_concurrency,
                  "prompts": len(run.prompts), "command": cmd, "wall_s": round(time.monotonic() - started, 1),
                  "metrics": run_metrics(result), "raw": result}
        self.records.append(record)
        print(progress_line(record), flush=True)
        return record


def run_capacity_ladder(session: Session, runs: list[Run], rates: list[float]) -> dict:
    """Stock's unloaded TTFT p50 sets the bound; each server climbs the ladder until it misses."""
    unloaded = session.measure(next(r for r in runs if r.kind == "unloaded"))["metrics"]["ttft_p50_ms"]
    if unloaded is None:
        raise BenchError("stock's unloaded long-context run completed no request")
    bound = CAPACITY_BOUND * unloaded
    print(f"  capacity bound: TTFT p90 < {bound:.0f} ms ({CAPACITY_BOUND:g}x stock's unloaded TTFT p50)", flush=True)
    p90 = {s: {} for s in SERVERS}
    for run in (r for r in runs if r.kind == "capacity"):
        if any(v is None or v >= bound for v in p90[run.server].values()):
            continue
        record = session.measure(run)
        ok = record["metrics"]["failed"] == 0
        p90[run.server][run.request_rate] = record["metrics"]["ttft_p90_ms"] if ok else None
    return capacity_summary(p90, bound, unloaded, rates)


# --- summary -----------------------------------------------------------------------------------

def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def server_medians(records: list[dict]) -> dict:
    """Medians over rounds of each reported figure, and the requests that failed in all rounds."""
    out = {f: median(r["metrics"][f] for r in records) for f in SUMMARY_FIELDS}
    return {**out, "rounds": len(records), "failed": sum(r["metrics"]["failed"] or 0 for r in records)}


def paired_ratios(records: list[dict]) -> dict:
    """Per round, FTP / stock of each ratio field (the two runs of the round), and their median."""
    by = {(r["round"], r["server"]): r["metrics"] for r in records}
    rounds = sorted({r for r, s in by if (r, "stock") in by and (r, "ftp") in by})
    out = {}
    for f in RATIO_FIELDS:
        pairs = [(by[r, "ftp"][f], by[r, "stock"][f]) for r in rounds]
        by_round = [x / s if x is not None and s else None for x, s in pairs]
        out[f] = {"by_round": by_round, "median": median(by_round)}
    return out


def summarise(records: list[dict]) -> dict:
    """Per workload (round runs only): each server's medians and the paired FTP / stock ratios."""
    measured = [r for r in records if r["kind"] == "round"]
    out = {}
    for workload in dict.fromkeys(r["workload"] for r in measured):
        mine = [r for r in measured if r["workload"] == workload]
        out[workload] = {"servers": {s: server_medians([r for r in mine if r["server"] == s]) for s in SERVERS},
                         "ftp_over_stock": paired_ratios(mine)}
    return out


def capacity(p90_by_rate: dict[float, float | None], bound: float) -> float | None:
    """The highest rate below which every rate of the ladder kept TTFT p90 under `bound`
    (None: not even the lowest did, or it was not run)."""
    best = None
    for rate in sorted(p90_by_rate):
        if p90_by_rate[rate] is None or p90_by_rate[rate] >= bound:
            break
        best = rate
    return best


def capacity_summary(p90: dict[str, dict], bound: float, unloaded_ttft_p50: float, rates: list[float]) -> dict:
    caps = {s: capacity(p90[s], bound) for s in SERVERS}
    ratio = caps["ftp"] / caps["stock"] if caps["ftp"] is not None and caps["stock"] else None
    return {"rates": rates, "stock_unloaded_ttft_p50_ms": unloaded_ttft_p50, "ttft_p90_bound_ms": bound,
            "ttft_p90_ms_by_rate": {s: {str(k): v for k, v in p90[s].items()} for s in SERVERS},
            "capacity_rps": caps, "ftp_over_stock": ratio}


def fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(summary: dict, cap: dict | None) -> None:
    print("\n| workload | server | rounds | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | ITL p50 / p90 (ms) "
          "| E2EL p50 / p90 (ms) | output tok/s | req/s | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload, s in summary.items():
        for server, m in s["servers"].items():
            pairs = " | ".join(f"{fmt(m[f'{x}_p50_ms'])} / {fmt(m[f'{x}_p90_ms'])}" for x in METRICS)
            print(f"| {workload} | {server} | {m['rounds']} | {pairs} | {fmt(m['output_throughput'], 1)} "
                  f"| {fmt(m['request_throughput'], 3)} | {m['failed']} |")
    print("\n| workload | FTP / stock: TTFT p50 (by round) | TPOT p50 (by round) | output tok/s (by round) |")
    print("| --- | --- | --- | --- |")
    for workload, s in summary.items():
        cells = []
        for f in RATIO_FIELDS:
            r = s["ftp_over_stock"][f]
            cells.append(f"{fmt(r['median'], 3)} ({', '.join(fmt(x, 3) for x in r['by_round'])})")
        print(f"| {workload} | {' | '.join(cells)} |")
    if cap:
        caps = {s: f"< {min(cap['rates']):g}" if c is None else f"{c:g}" for s, c in cap["capacity_rps"].items()}
        print(f"\nlong-context capacity (TTFT p90 < {cap['ttft_p90_bound_ms']:.0f} ms = {CAPACITY_BOUND:g}x "
              f"stock's unloaded TTFT p50; ladder {', '.join(f'{r:g}' for r in cap['rates'])} req/s): "
              f"stock {caps['stock']}, FTP {caps['ftp']} req/s, "
              f"FTP / stock {fmt(cap['ftp_over_stock'], 2)}")


def plot_ratios(summary: dict, path: Path) -> None:
    """One panel per workload: each paired ratio by round, with 1.0 (parity) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"ttft_p50_ms": "TTFT p50", "tpot_p50_ms": "TPOT p50", "output_throughput": "output tok/s"}
    fig, axes = plt.subplots(1, len(summary), figsize=(3.4 * len(summary), 3), sharey=True, squeeze=False)
    for ax, (workload, s) in zip(axes[0], summary.items()):
        for f in RATIO_FIELDS:
            ys = s["ftp_over_stock"][f]["by_round"]
            ax.plot(range(len(ys)), [math.nan if y is None else y for y in ys], marker="o", label=labels[f])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(s["ftp_over_stock"][RATIO_FIELDS[0]]["by_round"])))
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("FTP / stock")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--router", default="smollm2-135m-instruct-s30")
    p.add_argument("--workloads", nargs="+", default=list(workloads(0.15)), choices=list(workloads(0.15)))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=16, help="requests per run")
    p.add_argument("--long-context-rate", type=float, default=0.15, help="req/s, Poisson")
    p.add_argument("--capacity", action="store_true", help="also find each server's long-context capacity")
    p.add_argument("--capacity-rates", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot", help="PNG of the paired ratios (default: next to --json)")
    args, serve_args = p.parse_known_args(argv)
    if args.rounds < 1 or args.requests < 1:
        p.error("--rounds and --requests must be at least 1")
    return args, serve_args


def main(argv=None) -> int:
    args, serve_args = parse_args(argv)
    from transformers import AutoTokenizer

    from ftp_vllm.model_store import resolve_model
    from ftp_vllm.server_process import serve_command, shared_memory_args

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    runs = plan_runs(args.workloads, workloads(args.long_context_rate), args.rounds, args.requests,
                     sorted(args.capacity_rates) if args.capacity else None)
    fill_prompts(runs, tokenizer, args.seed)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    for sub in ("datasets", "results", "logs"):
        (work / sub).mkdir()
    print(f"{len(runs)} runs planned; datasets, results and logs in {work}", flush=True)

    serve_args = [*serve_args, *shared_memory_args(serve_args, len(SERVERS))]
    server_args = {"stock": [args.model, *serve_args], "ftp": [args.model, "--ftp-router", args.router, *serve_args]}
    cap = None
    try:
        with ExitStack() as stack:
            servers = {s: start_server(stack, s, server_args[s], work / f"{s}-server.log") for s in SERVERS}
            commands = {s: serve_command(server_args[s], "127.0.0.1", servers[s].port) for s in SERVERS}
            session = Session(servers, args.model, folder, work, args.seed)
            for run in (r for r in runs if r.kind in ("warm-up", "round")):
                session.measure(run)
            if args.capacity:
                cap = run_capacity_ladder(session, runs, sorted(args.capacity_rates))
    except BenchError as e:
        print(f"serve_bench: error: {e}", file=sys.stderr)
        return 1

    summary = summarise(session.records)
    print_summary(summary, cap)
    plot = Path(args.plot) if args.plot else (Path(args.json_out).with_suffix(".png") if args.json_out else None)
    if plot:
        plot_ratios(summary, plot)
    if args.json_out:
        out = {"command": " ".join(["python", "benchmarks/serve_bench.py", *(sys.argv[1:] if argv is None else argv)]),
               "settings": {**{k: v for k, v in vars(args).items() if k not in ("json_out", "plot")},
                            "serve_args": serve_args,
                            "workloads": {n: {**vars(w), "request_rate": rate_json(w.request_rate)}
                                          for n, w in workloads(args.long_context_rate).items() if n in args.workloads},
                            "long_prompt_tokens": LONG_PROMPT_TOKENS, "chat_words": CHAT_WORDS,
                            "system_words": SYSTEM_WORDS},
               "server_commands": commands, "summary": summary, "capacity": cap,
               "plot": str(plot) if plot else None, "runs": session.records}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    failed = sum(r["metrics"]["failed"] or 0 for r in session.records)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
