"""Load test: many concurrent streaming requests of mixed lengths against an FTP server.

    python benchmarks/serve_load.py                      # starts vllm serve with the 30% router
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct

Sends `--requests` (500) completions at `--concurrency` (64) with prompts of 8
to 600 words of held-out text and 1 to 128 output tokens (`ignore_eos`, so
every length is known), then checks that none failed, none was lost or
truncated (all tokens streamed, usage agrees, `[DONE]` seen), the server still
answers `/health` and, when this script started it, that its engine process
was never replaced.  Prints throughput and latency percentiles; `--json OUT`
writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import mixed_requests, run_load, summarise  # noqa: E402


def engine_pids(server) -> set[int]:
    from ftp_vllm.server_process import descendants

    return {p.pid for p in descendants(server.proc)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start vllm serve here)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--router", default="smollm2-135m-instruct-s30", help="router for the server this starts")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write the summary here")
    args, serve_args = p.parse_known_args(argv)

    import requests as http

    from ftp_vllm.server_process import vllm_server

    requests = mixed_requests(args.requests, args.seed)
    if args.url:
        context = nullcontext(None)
    else:
        log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
        print(f"starting vllm serve {args.model} --ftp-router {args.router} (log: {log})", flush=True)
        context = vllm_server([args.model, "--ftp-router", args.router, *serve_args], log)
    with context as server:
        url = args.url or server.base_url
        pids = engine_pids(server) if server else None
        print(f"{len(requests)} requests, concurrency {args.concurrency}, against {url}", flush=True)
        start = time.perf_counter()
        records, wall = run_load(url, args.model, requests, concurrency=args.concurrency, api_key=args.api_key)
        summary = summarise(records, wall)
        summary["healthy_after"] = http.get(f"{url}/health", timeout=30).status_code == 200
        if server:
            summary["engine_restarted"] = engine_pids(server) != pids or server.proc.poll() is not None
        summary["settings"] = {"requests": args.requests, "concurrency": args.concurrency, "model": args.model,
                               "router": None if args.url else args.router, "server_args": serve_args,
                               "command": " ".join(["python", "benchmarks/serve_load.py", *(argv or sys.argv[1:])])}
        print(f"done in {time.perf_counter() - start:.1f} s")
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    good = summary["failed"] == 0 and summary["healthy_after"] and not summary.get("engine_restarted", False)
    print("PASS" if good else "FAIL: " + "; ".join(summary["errors"]) if summary["errors"] else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
