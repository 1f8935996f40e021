"""The GPU recipe: every command it runs is accepted by the program it calls, bad arguments
stop it at once, and without a GPU it stops with one clear line."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

RECIPE = [sys.executable, str(ROOT / "benchmarks" / "gpu_recipe.py")]

# Runs a Python program (`script ARGS` or `-m module ARGS`) as its own `__main__` up to the
# end of its first argument parsing, then prints what the parser left unrecognised and exits
# 0.  Inner parses (a subcommand's parser) run as usual; a rejected argument exits 2 there.
PARSE_ONLY = r"""
import argparse, json, runpy, sys

original = argparse.ArgumentParser.parse_known_args
depth = 0

def parse_then_stop(self, args=None, namespace=None):
    global depth
    depth += 1
    try:
        namespace, unknown = original(self, args, namespace)
    finally:
        depth -= 1
    if depth == 0:
        print("PARSED " + json.dumps(unknown))
        sys.exit(0)
    return namespace, unknown

argparse.ArgumentParser.parse_known_args = parse_then_stop
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
raise SystemExit("the program ended without parsing arguments")
"""


def dry_run(tmp_path, *extra) -> list[str]:
    proc = subprocess.run([*RECIPE, "--model", "/models/llama-7b", "--out", str(tmp_path), "--dry-run", *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_dry_run_prints_each_step(tmp_path):
    lines = dry_run(tmp_path)
    assert len(lines) == 4
    assert "-m ftp_vllm.cli train --model /models/llama-7b --sparsity 0.3" in lines[0] and "--device cuda" in lines[0]
    assert "throughput.py" in lines[1] and "serve_bench.py" in lines[2] and "accuracy.py" in lines[3]
    assert all(re.search(f"--routers? {tmp_path}/router", line) for line in lines[1:])


def accepted(argv: list[str]) -> tuple[bool, str]:
    """Whether `argv` (a Python program and its arguments) parses, every argument recognised."""
    assert argv[0] == sys.executable
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, *argv[1:]], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    parsed = [line for line in proc.stdout.splitlines() if line.startswith("PARSED ")]
    ok = proc.returncode == 0 and len(parsed) == 1 and json.loads(parsed[0][len("PARSED "):]) == []
    return ok, proc.stdout[-1000:] + proc.stderr[-3000:]


def test_parse_only_rejects_what_the_program_rejects(tmp_path):
    """The check below can fail: an unknown method, an unknown flag and a missing required
    argument are each refused."""
    script = str(ROOT / "benchmarks" / "throughput.py")
    assert accepted([sys.executable, script, "--methods", "dense"])[0]
    assert not accepted([sys.executable, script, "--methods", "dense-compiled"])[0]
    assert not accepted([sys.executable, script, "--no-such-flag"])[0]
    assert not accepted([sys.executable, "-m", "ftp_vllm.cli", "train", "--out", str(tmp_path)])[0]


@pytest.mark.parametrize("step", ["train", "throughput", "serving", "accuracy"])
def test_each_command_is_accepted_by_the_program_it_calls(tmp_path, step):
    lines = dry_run(tmp_path, "--steps", step)
    assert len(lines) == 1
    ok, output = accepted(shlex.split(lines[0]))
    assert ok, f"{lines[0]}\n{output}"


def test_bad_arguments_stop_at_once(tmp_path, tiny_llama):
    bad = subprocess.run([*RECIPE, "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    bad = subprocess.run([*RECIPE, "--model", tiny_llama, "--sparsity", "1.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--sparsity" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message needs a machine without a GPU")
def test_without_a_gpu_it_stops_with_one_line(tmp_path, tiny_llama):
    proc = subprocess.run([*RECIPE, "--model", tiny_llama, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_recipe: error: no CUDA GPU is visible")
