"""GPU recipe: train a router for a 7B Llama-family model on one GPU, then benchmark it.

    python benchmarks/gpu_recipe.py --model /models/Llama-2-7b-hf --out results/gpu-7b

Steps, each a command of this project run in turn (printed before it starts,
so any one can be rerun alone; `--steps` picks some):

  train       ftp-vllm train --model M --sparsity S --device cuda --out OUT/router
              (run as `python -m ftp_vllm.cli`, so that no activated venv is needed)
  throughput  benchmarks/throughput.py: stock vs FTP vs ShortGPT, bfloat16, eager
              and vLLM's default compiled mode (torch.compile and CUDA graphs)
  serving     benchmarks/serve_bench.py: `vllm serve M` vs `vllm serve M --ftp-router OUT/router`,
              measured by `vllm bench serve`
  accuracy    benchmarks/accuracy.py: retention of the router and the baselines

The model is a local folder in Hugging Face layout (config.json, safetensors,
tokenizer): nothing is downloaded.  Needs one CUDA GPU; a 7B model in float32
for training takes about 28 GB of its memory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

STEPS = ("train", "throughput", "serving", "accuracy")
ROOT = Path(__file__).resolve().parents[1]


def commands(args) -> dict[str, list[str]]:
    """Each step's command line; paths are absolute, as the steps run from the repository root."""
    out, model = Path(args.out).absolute(), str(Path(args.model).absolute())
    router = str(out / "router")
    py = sys.executable
    return {
        "train": [py, "-m", "ftp_vllm.cli", "train", "--model", model, "--sparsity", str(args.sparsity),
                  "--decode-sparsity", str(args.decode_sparsity), "--device", "cuda", "--out", router],
        "throughput": [py, str(ROOT / "benchmarks" / "throughput.py"), "--model", model, "--routers", router,
                       "--methods", "dense", "ftp-keep-all", "ftp", "shortgpt", "--modes", "eager", "compiled",
                       "--dtype", "bfloat16", "--json", str(out / "throughput.json")],
        "serving": [py, str(ROOT / "benchmarks" / "serve_bench.py"), "--model", model, "--router", router,
                    "--capacity", "--json", str(out / "serve_bench.json")],
        "accuracy": [py, str(ROOT / "benchmarks" / "accuracy.py"), "--model", model, "--routers", router,
                     "--json", str(out / "accuracy.json")],
    }


def check_gpu() -> str:
    """The GPU's name, or a clear exit where there is none."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_recipe: error: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "this recipe needs one GPU. On a CPU machine use the benchmarks' own defaults instead.")
    return torch.cuda.get_device_name(0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local folder of a Llama-family model (e.g. 7B)")
    p.add_argument("--sparsity", type=float, default=0.3, help="router target sparsity (0.3)")
    p.add_argument("--decode-sparsity", type=float, default=0.0, help="decode-token sparsity (0: decode dense)")
    p.add_argument("--out", default="results/gpu-recipe", help="folder for the router and the JSON results")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = p.parse_args(argv)
    if not 0 < args.sparsity < 1:
        p.error("--sparsity must be between 0 and 1")
    config = Path(args.model) / "config.json"
    if not args.dry_run:  # a wrong folder is found here, not after the first step
        if not config.is_file():
            p.error(f"{args.model}: no config.json; --model must be a local model folder")
        archs = json.loads(config.read_text()).get("architectures") or []
        if not {"LlamaForCausalLM", "Qwen2ForCausalLM"} & set(archs):
            p.error(f"{args.model}: architecture {archs}; the recipe is for Llama-family models (Llama, Qwen2)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cmds = commands(args)
    if args.dry_run:
        for step in args.steps:
            print(shlex.join(cmds[step]))
        return 0
    print(f"GPU: {check_gpu()}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for step in args.steps:
        print(f"== {step}: {shlex.join(cmds[step])}", flush=True)
        if subprocess.run(cmds[step], cwd=ROOT).returncode:
            print(f"gpu_recipe: step {step} failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
