"""How far a router is from an oracle that sees each block's output, at the router's schedule.

    python benchmarks/selector_ceiling.py --json results/selector_ceiling.json

For each router, at its own prompt schedule (decode tokens kept, as the shipped
routers keep them), on held-out text (224-token routed prompt, then 32 tokens
scored under the decode rule), the continuation perplexity ratio and KL to the
dense model of:

- the router as served (its calibrated thresholds);
- the static router and random token choice (top-k per prompt);
- oracles, not servable since they need the block's output: top-k by how much
  the block changes a token (1 - cos of its input and output, standardised
  within the request), alone and mixed with recency (`--recency`; the static
  router's order), `ftp_vllm.baselines.change_oracle`.

The best oracle bounds what any better feature could buy at that schedule; the
schedule itself (searched with the static router) is held fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", nargs="*", default=[f"smollm2-135m-instruct-s{s}" for s in (20, 30, 40)])
    p.add_argument("--chunks", type=int, default=16, help="held-out chunks of 224 + 32 tokens")
    p.add_argument("--recency", nargs="*", type=float, default=[3.0, 10.0],
                   help="weights of recency (pos) beside the standardised change for the mixed oracles")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from ftp_vllm.checkpoint import CheckpointError, check_compatible, load_checkpoint
    from ftp_vllm.model_store import resolve_model
    from ftp_vllm.baselines import change_oracle, random_keep, static_keep
    from ftp_vllm.evaluation import ContinuationBatch, continuation_logprobs, kl_and_nll
    from ftp_vllm.reference import GivenMasks, RoutedModel, Served
    from ftp_vllm.texts import token_chunks

    start = time.perf_counter()
    folder = resolve_model(args.model)
    try:  # a bad router fails before the model loads, in one line
        routers = {name: load_checkpoint(name) for name in args.routers}
        for _, config in routers.values():
            check_compatible(config, folder)
    except CheckpointError as e:
        raise SystemExit(f"selector_ceiling: {e}") from None
    model = RoutedModel.from_pretrained(folder)
    batch = ContinuationBatch.of(token_chunks(AutoTokenizer.from_pretrained(folder), "evaluation", 256, args.chunks),
                                 224)
    dense = continuation_logprobs(model, batch)
    dense_nll = kl_and_nll(dense, dense, batch.targets)[1]
    cu, prompt_lens = batch.cu_seqlens, batch.prompt_lens
    rows = []
    for name, (router, _) in routers.items():
        schedule = router.sparsity.tolist()
        router.set_schedule(schedule, [0.0] * len(schedule))
        selectors = {
            "router": Served(router),
            "static": GivenMasks(static_keep(cu, schedule, prompt_lens)),
            "random": GivenMasks(random_keep(cu, schedule, prompt_lens, torch.Generator().manual_seed(0))),
            "oracle: change": change_oracle(schedule),
            **{f"oracle: change + {w:g} x recency": change_oracle(schedule, w) for w in args.recency},
        }
        for selector, keep in selectors.items():
            kl, nll = kl_and_nll(continuation_logprobs(model, batch, keep), dense, batch.targets)
            rows.append({"router": name, "prompt_sparsity": sum(schedule) / len(schedule), "selector": selector,
                         "ppl_ratio": math.exp(nll - dense_nll), "kl": kl})
            print(f"{name}  {selector:32s}  ppl ratio {rows[-1]['ppl_ratio']:.3f}  KL {kl:.3f}", flush=True)
    report = {"results": rows, "setup": {
        "command": "python benchmarks/selector_ceiling.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "text": f"held-out evaluation split, {args.chunks} chunks: 224-token routed prompt, 32 tokens scored, "
                "decode tokens kept", "dense_continuation_ppl": math.exp(dense_nll),
        "wall_time_s": round(time.perf_counter() - start, 1)}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
