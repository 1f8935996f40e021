"""Serving latency, dense vs FTP, against `vllm serve` at a few request rates.

    python benchmarks/serve_latency.py --json results/serve_latency.json

Starts one server per configuration (stock model; the same model with each
`--routers` router), the same engine settings for all (vLLM's default compiled
mode; `--enforce-eager` passes through like any other flag), and keeps them all
alive.  In each of `--repeats` rounds, at each `--rates` (requests/s, Poisson
arrivals), every server in turn (the order rotated from round to round) gets the
same `--requests` streaming completions of mixed lengths from held-out text;
only one server is loaded at a time, so they share the cores without competing.
Reports TTFT, TPOT (time per output token after the first), ITL (gap between
streamed tokens) and end-to-end latency at p50/p90/p99 for every run, then
medians over rounds and, per round, the ratio of each server's p50 to the stock
server's in the same round: a machine that drifts between rounds moves both.
`--one-at-a-time` starts each server only for its own turn (one round), for a
machine that cannot hold them all.  Extra arguments go to every `vllm serve`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import mixed_requests, run_load, summarise  # noqa: E402

METRICS = ("ttft_s", "tpot_s", "itl_s", "latency_s")


def summary_rows(runs: list[dict]) -> list[dict]:
    """Per server and rate: medians over rounds of each percentile, and the median over rounds
    of each p50's ratio to the stock server's p50 in the same round."""
    def median(values):  # None where no request of any round completed
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 4) if values else None

    out = []
    dense = {(r["rate"], r["round"]): r for r in runs if r["method"] == "dense"}
    keys = sorted({(r["method"], r["router"] or "", r["rate"]) for r in runs}, key=lambda k: (k[2], k[0] != "dense", k[1]))
    for method, router, rate in keys:
        mine = [r for r in runs if (r["method"], r["router"] or "", r["rate"]) == (method, router, rate)]
        row = {"method": method, "router": router or None, "rate": rate, "rounds": len(mine),
               "failed": sum(r["failed"] for r in mine),
               "output_tok_per_s": statistics.median(r["output_tok_per_s"] for r in mine)}
        for m in METRICS:
            row[m] = {p: median(r[m][p] for r in mine) for p in ("p50", "p90", "p99")}
            stock = [(r[m]["p50"], dense[rate, r["round"]][m]["p50"]) for r in mine if (rate, r["round"]) in dense]
            ratios = [x / d for x, d in stock if x is not None and d]
            if ratios:
                row[f"{m[:-2]}_p50_ratio_to_dense"] = round(statistics.median(ratios), 3)
                row[f"{m[:-2]}_p50_ratios_by_round"] = [round(x, 3) for x in ratios]
        out.append(row)
    return out


def print_summary(rows: list[dict]) -> None:
    print("\n| rate (req/s) | server | rounds | TTFT p50 / p99 (s) | TPOT p50 / p99 (s) | ITL p50 (s) "
          "| end-to-end p50 / p99 (s) | TPOT p50 / stock (by round) | TTFT p50 / stock | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "stock" if r["method"] == "dense" else f"FTP {r['router']}"
        by_round = ", ".join(f"{x:.3f}" for x in r.get("tpot_p50_ratios_by_round", []))
        print(f"| {r['rate']:g} | {name} | {r['rounds']} | {r['ttft_s']['p50']} / {r['ttft_s']['p99']} "
              f"| {r['tpot_s']['p50']} / {r['tpot_s']['p99']} | {r['itl_s']['p50']} "
              f"| {r['latency_s']['p50']} / {r['latency_s']['p99']} "
              f"| {r.get('tpot_p50_ratio_to_dense', '')} ({by_round}) | {r.get('ttft_p50_ratio_to_dense', '')} "
              f"| {r['failed']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", nargs="*", default=["smollm2-135m-instruct-s30"])
    p.add_argument("--rates", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--requests", type=int, default=64, help="requests per rate, server and round")
    p.add_argument("--repeats", type=int, default=3, help="rounds (servers alive at once)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="start each server for its own turn only (one round, servers not interleaved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out")
    args, serve_args = p.parse_known_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    from ftp_vllm.server_process import shared_memory_args, vllm_server

    configs = [("dense", None, [])] + [("ftp", r, ["--ftp-router", r]) for r in args.routers]
    mode = "eager" if "--enforce-eager" in serve_args else "compiled"
    rounds = 1 if args.one_at_a_time else args.repeats
    serve_args = serve_args + ([] if args.one_at_a_time else shared_memory_args(serve_args, len(configs)))
    requests = mixed_requests(args.requests, args.seed, prompt_words=(32, 400), outputs=(16, 64, 128))
    logs = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    runs = []

    def start(stack: ExitStack, method, router, flags):
        print(f"== {method} {router or ''}: vllm serve {args.model} {' '.join(flags + serve_args)}", flush=True)
        server = stack.enter_context(vllm_server([args.model, *flags, *serve_args], logs / f"{method}-{router}.log"))
        run_load(server.base_url, args.model, requests[:4], concurrency=4)  # warm-up
        return server

    def measure(server, method, router, rate, round_):
        records, wall = run_load(server.base_url, args.model, requests, rate=rate, seed=args.seed)
        row = {"method": method, "router": router, "rate": rate, "mode": mode, "round": round_,
               **summarise(records, wall)}
        runs.append(row)
        print(f"  round {round_} rate {rate:>5}/s {method} {router or ''}: ttft p50 {row['ttft_s']['p50']} "
              f"tpot p50 {row['tpot_s']['p50']} itl p50 {row['itl_s']['p50']} e2e p50 {row['latency_s']['p50']} "
              f"failed {row['failed']}", flush=True)

    if args.one_at_a_time:
        for method, router, flags in configs:
            with ExitStack() as stack:
                server = start(stack, method, router, flags)
                for rate in args.rates:
                    measure(server, method, router, rate, 0)
    else:
        with ExitStack() as stack:
            servers = [start(stack, *c) for c in configs]
            for round_ in range(rounds):
                order = list(range(len(configs)))
                order = order[round_ % len(order):] + order[:round_ % len(order)]
                for rate in args.rates:
                    for i in order:
                        measure(servers[i], configs[i][0], configs[i][1], rate, round_)

    summary = summary_rows(runs)
    print_summary(summary)
    out = {"summary": summary, "results": runs, "interleaved": not args.one_at_a_time,
           "command": " ".join(["python", "benchmarks/serve_latency.py", *(argv or sys.argv[1:])])}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
