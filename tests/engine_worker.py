"""Runs vLLM engines in a fresh process and prints their greedy outputs as JSON.

Tests call it as a subprocess: each engine starts worker processes by spawn,
and a test process must not hold an engine's threads or memory.  The runs in
one call share the (slow) vLLM import and start one after another.

    python tests/engine_worker.py < RUNS_JSON

RUNS_JSON (on stdin) is a list of {"llm": {LLM kwargs}, "prompts": [...], "max_tokens": N,
"one_by_one": bool, "also_together": bool, "env": {...}}; the answer is one
{"architecture", "tokens", "traces"[, "tokens_together"]} per run; with
`also_together` the same engine then generates all prompts in one batch.  With `one_by_one` each prompt is generated alone, and when
FTP_VLLM_TRACE is set in the run's env each prompt gets the routing trace
lines its steps wrote.
"""

import gc
import json
import os
import sys

# One process for the engine core and its worker: half the start-up time of
# the default process layout, and the same model computation.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    results = []
    for run in json.loads(sys.stdin.read()):
        os.environ.update(run.get("env", {}))
        trace = os.environ.get("FTP_VLLM_TRACE")
        llm = LLM(**{
            "enforce_eager": True,
            "kv_cache_memory_bytes": 1 << 30,
            "distributed_executor_backend": "uni",
            "seed": 0,
            **run["llm"],
        })
        params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True)
        groups = [[p] for p in run["prompts"]] if run.get("one_by_one") else [run["prompts"]]
        tokens, traces = [], []
        for group in groups:
            start = os.path.getsize(trace) if trace and os.path.exists(trace) else 0
            outputs = llm.generate(group, params, use_tqdm=False)
            tokens += [list(o.outputs[0].token_ids) for o in outputs]
            if trace:
                with open(trace, "a+") as f:
                    f.seek(start)
                    traces.append([json.loads(line) for line in f])
        result = {"architecture": llm.llm_engine.model_config.architecture, "tokens": tokens, "traces": traces}
        if run.get("also_together"):  # the same prompts again, all in one batch, same engine
            outputs = llm.generate(run["prompts"], params, use_tqdm=False)
            result["tokens_together"] = [list(o.outputs[0].token_ids) for o in outputs]
        results.append(result)
        for key in run.get("env", {}):
            os.environ.pop(key, None)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    print("ENGINE_RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
