"""The GPU recipe parses its arguments and, without a GPU, stops with one clear line."""

import subprocess
import sys

import torch

from .conftest import ROOT

RECIPE = [sys.executable, str(ROOT / "benchmarks" / "gpu_recipe.py")]


def test_dry_run_prints_each_step(tmp_path):
    proc = subprocess.run([*RECIPE, "--model", "/models/llama-7b", "--out", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("ftp-vllm train --model /models/llama-7b --sparsity 0.3") and "--device cuda" in lines[0]
    assert "throughput.py" in lines[1] and "serve_latency.py" in lines[2] and "accuracy.py" in lines[3]


def test_bad_arguments_and_no_gpu(tmp_path, tiny_llama):
    bad = subprocess.run([*RECIPE, "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    bad = subprocess.run([*RECIPE, "--model", tiny_llama, "--sparsity", "1.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--sparsity" in bad.stderr
    if torch.cuda.is_available():
        return
    proc = subprocess.run([*RECIPE, "--model", tiny_llama, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_recipe: error: no CUDA GPU is visible")
