"""`ftp-vllm`: the project's command line."""

from __future__ import annotations

import argparse
import sys

from .model_store import DEFAULT_MODEL, KNOWN_MODELS, ModelError, prepare_model


def _prepare_model(args) -> None:
    print(prepare_model(args.name, force=args.force))


def _tiny_model(args) -> None:
    from .tiny import write_tiny_model

    print(write_tiny_model(args.out, arch=args.arch, seed=args.seed))


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ModelError as e:
        print(f"ftp-vllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
