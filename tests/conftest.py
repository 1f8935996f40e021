import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def real_prompts(n: int, words: int = 40) -> list[str]:
    """Openings of the Python language reference's topics: real English prose, offline."""
    from pydoc_data.topics import topics

    texts = [" ".join(topics[k].split()[:words]) for k in sorted(topics) if len(topics[k].split()) >= words]
    return texts[:n]


def run_engines(runs: list[dict], timeout: int = 900) -> list[dict]:
    """Per run, the resolved architecture and greedy token ids per prompt, from vLLM
    engines in a fresh process."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine_worker.py"), json.dumps(runs)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("ENGINE_RESULTS ")]
    assert proc.returncode == 0 and lines, f"engine run failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.fixture(scope="session")
def real_model() -> str:
    from ftp_vllm.model_store import prepare_model

    return str(prepare_model())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from ftp_vllm.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    from ftp_vllm.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2"))
