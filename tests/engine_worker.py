"""Runs vLLM engines in a fresh process and prints their greedy outputs as JSON.

Tests call it as a subprocess: each engine starts worker processes by spawn,
and a test process must not hold an engine's threads or memory.  The runs in
one call share the (slow) vLLM import and start one after another.

    python tests/engine_worker.py RUNS_JSON

RUNS_JSON is a list of {"llm": {LLM kwargs}, "prompts": [...], "max_tokens": N};
the answer is one {"architecture", "tokens"} per run.
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
    for run in json.loads(sys.argv[1]):
        llm = LLM(**{
            "enforce_eager": True,
            "kv_cache_memory_bytes": 1 << 30,
            "distributed_executor_backend": "uni",
            "seed": 0,
            **run["llm"],
        })
        params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True)
        outputs = llm.generate(run["prompts"], params, use_tqdm=False)
        results.append({
            "architecture": llm.llm_engine.model_config.architecture,
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        })
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    print("ENGINE_RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
