"""Serving latency, dense vs FTP, against `vllm serve` at a few request rates.

    python benchmarks/serve_latency.py --json results/serve_latency.json

Starts one server per configuration in turn (stock model; the same model with
each `--routers` router), the same engine settings for all (vLLM's default
compiled mode; `--enforce-eager` passes through like any other flag), and at each
`--rates` (requests/s, Poisson arrivals) sends `--requests` streaming
completions of mixed lengths from held-out text.  Reports TTFT, TPOT
(time per output token after the first), ITL (gap between streamed tokens)
and end-to-end latency at p50/p90/p99, plus throughput; servers run one at a
time on the same cores.  Extra arguments go to every `vllm serve`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import mixed_requests, run_load, summarise  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", nargs="*", default=["smollm2-135m-instruct-s30"])
    p.add_argument("--rates", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--requests", type=int, default=64, help="requests per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out")
    args, serve_args = p.parse_known_args(argv)

    from ftp_vllm.server_process import vllm_server

    configs = [("dense", None, [])] + [("ftp", r, ["--ftp-router", r]) for r in args.routers]
    mode = "eager" if "--enforce-eager" in serve_args else "compiled"
    requests = mixed_requests(args.requests, args.seed, prompt_words=(32, 400), outputs=(16, 64, 128))
    results = []
    logs = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    for method, router, flags in configs:
        print(f"== {method} {router or ''}: vllm serve {args.model} {' '.join(flags + serve_args)}", flush=True)
        with vllm_server([args.model, *flags, *serve_args], logs / f"{method}-{router}.log") as server:
            run_load(server.base_url, args.model, requests[:4], concurrency=4)  # warm-up
            for rate in args.rates:
                records, wall = run_load(server.base_url, args.model, requests, rate=rate, seed=args.seed)
                row = {"method": method, "router": router, "rate": rate, "mode": mode, **summarise(records, wall)}
                results.append(row)
                print(f"  rate {rate:>5}/s: ttft p50 {row['ttft_s']['p50']} p99 {row['ttft_s']['p99']}  "
                      f"tpot p50 {row['tpot_s']['p50']}  e2e p50 {row['latency_s']['p50']} p99 {row['latency_s']['p99']}  "
                      f"failed {row['failed']}", flush=True)
    out = {"results": results, "command": " ".join(["python", "benchmarks/serve_latency.py", *(argv or sys.argv[1:])])}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
