"""A router that also routes decode tokens, for measuring what decode routing buys in speed.

    python benchmarks/decode_router.py smollm2-135m-instruct-s30 --out results/s30-decode30

Takes a router, gives decode tokens its prompt schedule (or `--decode-sparsity`
scaled from it), and calibrates the decode thresholds on the calibration text's
continuations so that each block's realised decode sparsity there equals its
target.  The router is not retrained for decode tokens, so its quality on
continuations is not what a trained one would reach: it answers how fast, not
how well (`benchmarks/accuracy.py` measures quality).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("router", help="shipped router name or checkpoint folder")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--decode-sparsity", type=float, default=None,
                   help="mean decode target (default: the prompt schedule's mean)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from ftp_vllm.checkpoint import load_checkpoint, save_checkpoint
    from ftp_vllm.model_store import resolve_model
    from ftp_vllm.pipeline import TrainSettings, calibration_split
    from ftp_vllm.reference import RoutedModel, calibrate_router_thresholds
    from ftp_vllm.schedule import scaled_schedule

    router, config = load_checkpoint(args.router)
    model_name = config["base_model"].get("name", "smollm2-135m-instruct")
    s = TrainSettings(model=model_name, sparsity=config["target_sparsity"], out=args.out)
    folder = resolve_model(s.model)
    model = RoutedModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = calibration_split(tokenizer, s)[1]  # the text the prompt thresholds were fitted on
    prompt = router.sparsity.tolist()
    decode = prompt if args.decode_sparsity is None else scaled_schedule(prompt, args.decode_sparsity)
    router.set_schedule(prompt, decode)
    with torch.no_grad():
        calibrate_router_thresholds(model, router, calib.input_ids, calib.cu_seqlens, calib.prompt_lens,
                                    logits_at=calib.input_ids.new_zeros(0))
    config = {k: v for k, v in config.items() if k not in ("schema_version", "router", "schedule")}
    config["decode_target_sparsity"] = round(sum(decode) / len(decode), 6)
    config["decode_routing"] = "decode thresholds calibrated by benchmarks/decode_router.py; not trained for decode"
    print(save_checkpoint(args.out, router, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
