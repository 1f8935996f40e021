"""`make serve`'s launcher on the real model: OpenAI clients, curl as the README writes it, clean shutdown."""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(real_model, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "serving" / "launch.py"), "--port", str(port), "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        log.seek(0)
        if "launch: ready at" in log.read():
            break
        time.sleep(2)
    log.seek(0)
    assert proc.poll() is None and "launch: ready at" in log.read(), log.read()[-4000:]
    yield {"port": port, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()


def test_openai_client_completions_chat_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    done = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert "Paris" in done.choices[0].text
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == chat.choices[0].message.content


def test_readme_curl_examples_work_as_written(server):
    readme = (ROOT / "README.md").read_text()
    commands = [m.replace("\\\n", " ") for m in re.findall(r"^(curl .+?)(?<!\\)$", readme, flags=re.M | re.S)]
    assert len(commands) >= 3
    for cmd in commands:
        cmd = cmd.replace("127.0.0.1:8000", f"127.0.0.1:{server['port']}")
        out = subprocess.run(shlex.split(cmd) + ["--fail", "--silent", "--show-error"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{cmd}\n{out.stderr}"
        assert '"choices"' in out.stdout or "data: " in out.stdout, out.stdout[:500]


def test_sigterm_stops_server_and_engine(server):
    proc = server["proc"]
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the launcher should run vllm serve as its child"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) is not None
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"left running: {[p.pid for p in alive]}"
