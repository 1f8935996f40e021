"""`--ftp-router` and `--ftp-sparsity` on vLLM's own command line.

vLLM loads general plugins before it builds its argument parser, so the
plugin can add flags to `vllm serve` (and every command built on
`EngineArgs`): the router, and the level of its ladder (`ftp_vllm.ladder`)
that requests naming none are served at.  The flags are turned into what the
engine already understands before any engine process starts: `hf_overrides`
that switch the architecture to its FTP class and name the router checkpoint
and the level.  A bad router or level stops start-up there with one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftp_vllm import BASE_ARCHITECTURES

ROUTER_HELP = (
    "FTP router: a checkpoint folder (router.safetensors + ftp_config.json) or the name "
    "of a router shipped with ftp_vllm, e.g. smollm2-135m-instruct-s30. Switches the model "
    "to its FTP class (token routing)."
)


LEVEL_HELP = (
    "FTP level (prompt sparsity) of requests that name none, one of the router's levels or "
    "between them (the highest at or below it serves; 0 is the dense model). Default: the "
    "router's own. A request chooses its level with vllm_xargs {\"ftp_sparsity\": 0.2}."
)


def ftp_architecture(model_folder: str | Path) -> str:
    """The FTP class for a model folder's architecture."""
    config = Path(model_folder) / "config.json"
    archs = json.loads(config.read_text()).get("architectures") or []
    for arch in archs:
        if arch in BASE_ARCHITECTURES.values():
            return arch
        if arch in BASE_ARCHITECTURES:
            return BASE_ARCHITECTURES[arch]
    raise ValueError(f"{config}: architecture {archs} has no FTP class; supported: {', '.join(BASE_ARCHITECTURES)}")


def routing_overrides(model: str, router: str, hf_overrides: dict | None = None, level: float | None = None) -> dict:
    """`hf_overrides` that serve `model` (a folder) with `router`, checked against each other;
    requests that name no level get `level` (default: the router's own default)."""
    from ftp_vllm.checkpoint import check_compatible, load_ladder, resolve_router

    path = resolve_router(router)
    ladder, config = load_ladder(path)
    check_compatible(config, model)
    overrides = {**(hf_overrides or {}), "architectures": [ftp_architecture(model)], "ftp_router": str(path)}
    if level is not None:
        overrides["ftp_sparsity"] = ladder.check_level(level)
    return overrides


def apply_ftp_args(args: argparse.Namespace) -> None:
    """Resolve a known model name to its folder, and `--ftp-router` to overrides."""
    from ftp_vllm.model_store import KNOWN_MODELS, ModelError, resolve_model
    from ftp_vllm.server_routes import install_server_routes

    model = getattr(args, "model", None)
    router = getattr(args, "ftp_router", None)
    try:
        if model in KNOWN_MODELS and not Path(model).exists():
            args.model = resolve_model(model)
            if getattr(args, "served_model_name", None) is None:
                args.served_model_name = [model]
        level = getattr(args, "ftp_sparsity", None)
        if level is not None and not router:
            raise ValueError("--ftp-sparsity sets the level of a router's ladder: give --ftp-router too")
        if router:
            overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
            args.hf_overrides = routing_overrides(args.model, router, overrides, level)
            install_server_routes(args, args.hf_overrides["ftp_router"], level)
    except (ModelError, ValueError, OSError) as e:
        raise SystemExit(f"ftp-vllm: error: {e}") from None


def install_cli_hooks() -> None:
    """Add `--ftp-router` to EngineArgs' parser and honour it in `from_cli_args` (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "ftp_hook", False):
        return
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args_with_router(parser):
        parser = add_cli_args(parser)
        group = parser.add_argument_group("FTP", "Fine-grained token routing (ftp_vllm plugin)")
        group.add_argument("--ftp-router", default=None, help=ROUTER_HELP)
        group.add_argument("--ftp-sparsity", type=float, default=None, help=LEVEL_HELP)
        return parser

    def from_cli_args_with_router(cls, args):
        apply_ftp_args(args)
        return from_cli_args(cls, args)

    add_cli_args_with_router.ftp_hook = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_router)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_router)
