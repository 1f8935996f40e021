"""vLLM engines in a process of their own, for tests and benchmarks.

An engine holds the threads and memory of its process for as long as that
lives, and vLLM starts its workers by spawn, so a caller that compares
engines, or must leave none behind, runs them in a child process.  The child
reads one JSON request a line on stdin and answers each with one JSON line on
a channel of its own (vLLM logs to stdout; in the child that goes to the log
with stderr).  A request starts an engine, runs a job on it, or stops it.  A
job is a function `job(llm, **kwargs)` returning something JSON can write, in
a Python file the child loads by path: the code that reads a job's result
keeps the job beside it.

    with EngineProcess(log_path) as engine:
        engine.start({"model": folder, "enforce_eager": True})
        tokens = engine.run(greedy_outputs, prompts=["The capital of France is"], max_tokens=8)
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import MutableMapping
from pathlib import Path

from ftp_vllm.hardware import bind_cpu_threads

# `LLM` arguments under the caller's: a KV cache that fits a CPU's NUMA node (vLLM's default
# share of memory does not), the worker in the engine's process, and seeded sampling.
ENGINE_DEFAULTS = {"kv_cache_memory_bytes": 1 << 30, "distributed_executor_backend": "uni", "seed": 0}


def engine_env(env: MutableMapping) -> MutableMapping:
    """Set in `env`: the engine core in the caller's process (so that one process holds the
    model, and a job reaches it), OpenMP threads on every core unless bound already."""
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return bind_cpu_threads(env)


class EngineError(RuntimeError):
    """The engine process failed or timed out; the message ends with its log's tail."""


class EngineProcess:
    """A child process that holds one engine at a time; `timeout` (seconds) bounds its whole life."""

    def __init__(self, log_path: str | Path | None = None, timeout: float | None = None):
        self.log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "ftp_vllm.engine_process"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=engine_env(dict(os.environ)))
        self.timed_out = False
        self._timer = None
        if timeout is not None:
            self._timer = threading.Timer(timeout, self._kill_on_timeout)
            self._timer.daemon = True
            self._timer.start()

    def start(self, llm: dict, env: dict | None = None) -> dict:
        """Start an engine with `LLM(**ENGINE_DEFAULTS, **llm)`, `env` set in the process until
        `stop`; answers the resolved architecture."""
        return self._request({"request": "start", "llm": llm, "env": env or {}})

    def run(self, job, **kwargs):
        """`job(llm, **kwargs)` in the engine's process; `job` is a function defined at the top
        level of a file that imports without relative imports."""
        return self._request({"request": "run", "file": os.path.abspath(job.__code__.co_filename),
                              "function": job.__name__, "kwargs": kwargs})

    def stop(self) -> None:
        """Shut the engine down and unset its `env`: the process can start another."""
        self._request({"request": "stop"})

    def close(self) -> None:
        """End the process (its engine with it) and wait for it."""
        if self._timer:
            self._timer.cancel()
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        size = self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, size - chars))
        return self.log.read().decode(errors="replace")

    def _kill_on_timeout(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def _request(self, request: dict):
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            why = "timed out and was killed" if self.timed_out else f"exited with code {code}"
            raise EngineError(f"engine process {why} during '{request['request']}'; log tail:\n{self.log_tail()}")
        return json.loads(line)


# ---- the child process ---------------------------------------------------------------

def load_job(file: str, function: str):
    """A job function from a file, each file loaded once."""
    name = "engine_job_" + Path(file).stem
    module = sys.modules.get(name)
    if module is None or module.__file__ != file:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return getattr(module, function)


def serve(requests, channel) -> None:
    """Answer `requests` (JSON lines) on `channel` until they end."""
    llm, env_keys = None, []
    for line in requests:
        request = json.loads(line)
        kind = request["request"]
        if kind == "start":
            from vllm import LLM

            os.environ.update(request["env"])
            env_keys = list(request["env"])
            llm = LLM(**{**ENGINE_DEFAULTS, **request["llm"]})
            answer = {"architecture": llm.llm_engine.model_config.architecture}
        elif kind == "run":
            answer = load_job(request["file"], request["function"])(llm, **request["kwargs"])
        elif kind == "stop":
            llm.llm_engine.engine_core.shutdown()
            llm = None
            gc.collect()
            for key in env_keys:
                os.environ.pop(key, None)
            answer = None
        else:
            raise ValueError(f"unknown request {kind!r}")
        channel.write(json.dumps(answer) + "\n")
        channel.flush()


def main() -> None:
    # Answers get the process's stdout to themselves; whatever else writes there goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, channel)


if __name__ == "__main__":
    main()
