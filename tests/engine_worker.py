"""The engine tests' job (`ftp_vllm.engine_process`): greedy outputs and routing traces.

Runs in the engine's process.  With `one_by_one` each prompt is generated
alone, and when FTP_VLLM_TRACE is set in the engine's env each prompt gets
the routing trace lines its steps wrote; with `also_together` the same engine
then generates all prompts in one batch.
"""

import json
import os

from ftp_vllm import envs


def greedy_outputs(llm, prompts: list, max_tokens: int, one_by_one: bool = False,
                   also_together: bool = False, levels: list | None = None) -> dict:
    """{"tokens", "traces", "score_writes"[, "tokens_together"]}: greedy token ids per prompt
    (`ignore_eos`), each at its level of the router's ladder where `levels` name them (None:
    the default), and for each write of router scores to the score cache, the [prompt
    tokens, tokens] of its step."""
    from vllm import SamplingParams

    from ftp_vllm.models.routing import RoutingState

    score_writes, store = [], RoutingState._store

    def recorded(self, block, scores, num_slots):
        score_writes.append([self.step.num_prompt, self.step.num_tokens])
        return store(self, block, scores, num_slots)

    RoutingState._store = recorded
    try:
        trace = envs.FTP_VLLM_TRACE
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                 extra_args=None if level is None else {"ftp_sparsity": level})
                  for level in (levels or [None] * len(prompts))]
        groups = [[i] for i in range(len(prompts))] if one_by_one else [list(range(len(prompts)))]
        tokens, traces = [], []
        for group in groups:
            start = os.path.getsize(trace) if trace and os.path.exists(trace) else 0
            outputs = llm.generate([prompts[i] for i in group], [params[i] for i in group], use_tqdm=False)
            tokens += [list(o.outputs[0].token_ids) for o in outputs]
            if trace:
                with open(trace, "a+") as f:
                    f.seek(start)
                    traces.append([json.loads(line) for line in f])
        result = {"tokens": tokens, "traces": traces, "score_writes": list(score_writes)}
        if also_together:  # the same prompts again, all in one batch, same engine
            outputs = llm.generate(prompts, params, use_tqdm=False)
            result["tokens_together"] = [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        RoutingState._store = store
    return result
