"""Start `vllm serve` on an FTP model with settings that suit this machine.

    python serving/launch.py [--model NAME_OR_FOLDER] [--ftp-router NAME_OR_FOLDER | --no-router]
                             [--host H] [--port P] [any vllm serve flag ...]

A known model name is prepared on first use and served with its shipped dial
(one router at levels 0-40%, chosen per request, 30% by default) unless told
otherwise; the folder's architecture is switched to its FTP class; on a
machine without a GPU the engine gets its threads bound and a KV cache sized
from free memory.  The launcher waits until
`/health` answers, prints the URL and a ready-to-paste request, and passes
Ctrl-C / SIGTERM on to the server so that no engine process is left behind.
Every flag it does not know goes to `vllm serve` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from ftp_vllm import server_process
from ftp_vllm.model_store import DEFAULT_MODEL, KNOWN_MODELS, ModelError, resolve_model
from ftp_vllm.server_process import has_flag
from ftp_vllm.vllm_args import ftp_architecture


def default_router(model_arg: str) -> str | None:
    """The shipped router of a known model: its dial (levels chosen per request, 30% by
    default) where there is one, else its 30% router."""
    from ftp_vllm.checkpoint import SHIPPED

    for name in (f"{model_arg}-dial", f"{model_arg}-s30"):
        if model_arg in KNOWN_MODELS and (SHIPPED / name).is_dir():
            return name
    return None


def serve_args(model_arg: str, router: str | None, extra: list[str]) -> list[str]:
    """`vllm serve`'s arguments for the model folder, its router (or the FTP class without
    one) and the name a known model is served under, then `extra`."""
    folder = str(resolve_model(model_arg))
    args = [folder]
    if router:  # vLLM's own --ftp-router (added by the plugin) checks it and switches the class
        args += ["--ftp-router", router]
    else:
        args += ["--hf-overrides", json.dumps({"architectures": [ftp_architecture(folder)]})]
    if model_arg in KNOWN_MODELS and not has_flag(extra, "--served-model-name"):
        args += ["--served-model-name", model_arg]
    return args + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a known model name or a model folder")
    parser.add_argument("--ftp-router", default=None,
                        help="router checkpoint folder or shipped name (default: the model's shipped dial, 30%% unless "
                             "a request or --ftp-sparsity names another level)")
    parser.add_argument("--no-router", action="store_true", help="serve the FTP class without a router (dense)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you choose otherwise)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /health")
    args, extra = parser.parse_known_args(argv)
    try:
        router = None if args.no_router else (args.ftp_router or default_router(args.model))
        cmd = server_process.serve_command(serve_args(args.model, router, extra), args.host, args.port)
    except (ModelError, ValueError) as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2

    print("launch: " + " ".join(cmd), flush=True)
    proc = server_process.start(cmd, env=server_process.serve_env())

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    base = f"http://{args.host}:{args.port}"
    engine = []
    try:
        if server_process.wait_healthy(proc, f"{base}/health", args.ready_timeout):
            engine = server_process.descendants(proc)
            name = args.model if args.model in KNOWN_MODELS else cmd[2]
            body = json.dumps({"model": name, "prompt": "The capital of France is", "max_tokens": 16})
            print(f"\nlaunch: ready at {base}/v1  (Ctrl-C stops it)", flush=True)
            auth = " -H 'Authorization: Bearer YOUR_API_KEY'" if has_flag(extra, "--api-key") or os.environ.get("VLLM_API_KEY") else ""
            print(f"launch: curl {base}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n", flush=True)
        elif proc.poll() is None:
            print(f"launch: error: no answer from {base}/health after {args.ready_timeout:.0f} s; stopping", file=sys.stderr)
            server_process.stop(proc)
        return proc.wait()
    finally:
        server_process.stop(proc, engine)


if __name__ == "__main__":
    sys.exit(main())
