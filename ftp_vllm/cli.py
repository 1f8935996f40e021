"""`ftp-vllm`: the project's command line."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .model_store import DEFAULT_MODEL, KNOWN_MODELS, ModelError, prepare_model


def _prepare_model(args) -> None:
    print(prepare_model(args.name, force=args.force))


def _tiny_model(args) -> None:
    from .tiny import write_tiny_model

    print(write_tiny_model(args.out, arch=args.arch, seed=args.seed))


def _train(args) -> None:
    import shlex

    from .pipeline import TrainSettings, format_summary, run_training

    fields = TrainSettings.__dataclass_fields__
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in fields})
    folder, config = run_training(settings, command="ftp-vllm " + shlex.join(args.argv))
    print(format_summary(folder, config))


def _calibrate_short_prompts(args) -> None:
    import shlex

    from .pipeline import add_short_thresholds

    folder, config = add_short_thresholds(args.router, args.out, command="ftp-vllm " + shlex.join(args.argv),
                                          min_prompt=args.min_prompt)
    report = config["realised_sparsity"]["short_prompts"]
    print(f"router checkpoint: {folder}")
    print(f"target prompt sparsity {config['target_sparsity']}; realised on held-out prompts of")
    for length, r in report.items():
        print(f"  {length:>4} tokens: {r['held_out_prompt_sparsity']}  ({r['held_out_windows']} prompts; "
              f"thresholds fitted on {r['calibration_windows']})")


def _rescale(args) -> None:
    import shlex

    from .pipeline import format_summary, rescale_router

    folder, config = rescale_router(args.router, args.sparsity, args.out, command="ftp-vllm " + shlex.join(args.argv),
                                    search_generations=args.search_generations, train_steps=args.train_steps,
                                    lr=args.lr, progress=args.progress)
    print(format_summary(folder, config))


def _ladder(args) -> None:
    import shlex

    from .pipeline import build_ladder

    folder, config = build_ladder(args.router, args.levels, args.out, args.default,
                                  command="ftp-vllm " + shlex.join(args.argv), progress=args.progress)
    print(f"ladder checkpoint: {folder}; requests that name no level get {config['ladder']['default']:g}")
    print("  level 0: the dense model")
    for rung in config["ladder"]["rungs"]:
        held_out = rung["realised_sparsity"]["evaluation_text (held out)"]["prompt"]["mean"]
        ppl = rung["quality"]["routed, decode dense"]["ppl_ratio_to_dense"]
        print(f"  level {rung['level']:g}: held-out prompt sparsity {held_out}, ppl ratio to dense {ppl}")


def _add_train_parser(sub) -> None:
    from .pipeline import TrainSettings

    defaults = TrainSettings(model="", sparsity=0.0, out="")
    p = sub.add_parser("train", help="search a sparsity schedule and train a router; write a checkpoint")
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name or model folder")
    p.add_argument("--sparsity", type=float, required=True, help="overall target: mean per-block prompt sparsity")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--decode-sparsity", type=float, default=None,
                   help="overall decode-token sparsity (default: the prompt schedule)")
    for name, help_ in [
        ("steps", "router training steps"), ("seed", "seed of data order, search and initialisation"),
        ("lr", "router learning rate"), ("train_batch", "chunks per training step"),
        ("temperature_start", "training gate temperature at the first step, annealed geometrically to --temperature"),
        ("temperature", "training gate temperature at the last step"),
        ("guide_fit_steps", "warm-start steps on the guide loss"),
        ("min_prompt", "prompts shorter than this many tokens are served dense"), ("chunk_len", "tokens per text chunk"),
        ("context", "routed prompt tokens of a scored chunk; the rest is the continuation"),
        ("short_context", "the schedule search also scores search chunks cut into prompts this short; 0: not"),
        ("search_chunks", "calibration chunks scored by the schedule search"),
        ("calib_chunks", "calibration chunks for router inputs and thresholds"),
        ("train_chunks", "calibration chunks for training"), ("eval_chunks", "held-out evaluation chunks"),
        ("population", "schedules per generation"), ("generations", "generations with the static router"),
        ("router_generations", "generations with the trained router"),
        ("upper", "largest sparsity of one block"), ("step", "sparsity resolution of the search"),
        ("device", "torch device of the frozen model and the router, e.g. cuda"),
    ]:
        default = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"{help_} ({default})")
    p.add_argument("--gate", choices=["calibrated", "fixed"], default=defaults.gate,
                   help="training gate: thresholds calibrated to the targets on every step, or p > 0.5 (calibrated)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftp-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="build a known model's folder and print its path")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(KNOWN_MODELS))
    p.add_argument("--force", action="store_true", help="rebuild even if a verified folder exists")
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser("tiny-model", help="write a randomly initialised tiny model (for tests only)")
    p.add_argument("out")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    _add_train_parser(sub)

    p = sub.add_parser("calibrate-short-prompts",
                       help="give a router checkpoint thresholds of its own for prompts shorter than its training context")
    p.add_argument("router", help="router checkpoint folder or shipped name")
    p.add_argument("--out", help="write here instead of updating the checkpoint in place")
    p.add_argument("--min-prompt", type=int,
                   help="route prompts from this many tokens on (default: the checkpoint's min_prompt)")
    p.set_defaults(func=_calibrate_short_prompts)

    p = sub.add_parser("rescale", help="a router at another sparsity from a trained one: its schedule scaled, "
                                       "optionally searched and its MLP trained further, thresholds calibrated "
                                       "again; write a checkpoint")
    p.add_argument("router", help="router checkpoint folder or shipped name")
    p.add_argument("--sparsity", type=float,
                   help="overall target: mean per-block prompt sparsity (default: the router's own)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--search-generations", type=int, default=0,
                   help="search the scaled schedule further with the router for this many generations (0)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train the MLP further at the schedule for this many steps, as train does; kept only "
                        "if it does better on calibration text (0)")
    p.add_argument("--lr", type=float, help="learning rate of that training (default: the router's training's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_rescale)

    p = sub.add_parser("ladder", help="one checkpoint serving a router at several levels, chosen per request: "
                                      "its own level, and the others rescaled from it")
    p.add_argument("router", help="router checkpoint folder or shipped name")
    p.add_argument("--levels", type=float, nargs="+", required=True,
                   help="levels (overall prompt sparsity) of the rungs, e.g. 0.1 0.2 0.3 0.4; 0, dense, is always one")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--default", type=float,
                   help="level of requests that name none (default: the router's own, if a rung, else the highest)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_ladder)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except (ModelError, CheckpointError) as e:
        print(f"ftp-vllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
