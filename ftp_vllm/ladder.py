"""A sparsity dial: one router's operating points, chosen per request.

The router's MLP takes a block's target sparsity as an input, so one MLP serves
several schedules, each with thresholds calibrated for it (`ftp-vllm rescale`).
A ladder holds them as rungs sharing the MLP, the mean queries and the feature
statistics, by overall prompt sparsity (the level); rung 0 is always the dense
model.  A request names a level (`ftp_sparsity` in `SamplingParams.extra_args`,
`vllm_xargs` through the OpenAI API) and gets the highest rung at or below it;
one that names none gets the server's default.  A single-level checkpoint is a
ladder of two rungs: dense and its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ftp_vllm.router import Router

LEVEL_ARG = "ftp_sparsity"  # the per-request key in SamplingParams.extra_args (vllm_xargs)


def dense_rung(like: Router) -> Router:
    """A rung that routes nothing: `like`'s shape and shared tensors, every target 0."""
    rung = Router(like.num_blocks, like.mean_query.shape[1], like.mean_query.shape[2], like.mlp.fc1.out_features,
                  like.min_prompt, like.short_lengths, like.threshold_length)
    rung.load_state_dict(like.state_dict())
    rung.set_schedule([0.0] * like.num_blocks, [0.0] * like.num_blocks)
    return rung


class Ladder:
    """Rungs (routers sharing one MLP) by level, rising from the dense rung at level 0."""

    def __init__(self, rungs: Sequence[Router], levels: Sequence[float], default: float | None = None):
        rungs, levels = list(rungs), [float(x) for x in levels]
        if len(rungs) != len(levels) or not rungs:
            raise ValueError(f"{len(rungs)} rungs for levels {levels}")
        if levels[0] > 0:
            rungs, levels = [dense_rung(rungs[0]), *rungs], [0.0, *levels]
        if any(b <= a for a, b in zip(levels, levels[1:])) or levels[0] != 0:
            raise ValueError(f"ladder levels {levels} must rise from 0")
        self.rungs, self.levels = rungs, levels
        self.default_rung = len(levels) - 1  # the top, unless set
        self.set_default(default)
        num_blocks = rungs[0].num_blocks
        # host copies: which rung routes which kind of token (prompt, decode) at which block
        self.prompt_routed = [[r.targets(b)[0] > 0 for r in rungs] for b in range(num_blocks)]
        self.decode_routed = [[r.targets(b)[1] > 0 for r in rungs] for b in range(num_blocks)]
        self.routes_prompts = [any(col[i] for col in self.prompt_routed) for i in range(len(rungs))]
        self.routes_decode = [any(col[i] for col in self.decode_routed) for i in range(len(rungs))]
        self.sparsity = torch.stack([r.sparsity for r in rungs], 1)  # [B, rungs]: each rung's MLP input

    @property
    def router(self) -> Router:
        """The top rung: what every rung shares (MLP, mean queries, feature statistics, shape)."""
        return self.rungs[-1]

    @property
    def top(self) -> float:
        return self.levels[-1]

    @property
    def default(self) -> float:
        return self.levels[self.default_rung]

    def set_default(self, level: float | None) -> None:
        """The rung a request that names no level gets (None: unchanged)."""
        if level is not None:
            self.default_rung = self.rung_index(self.check_level(level))

    def check_level(self, value) -> float:
        """`value` as a level, or ValueError naming the allowed range."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not 0 <= value <= self.top + 1e-9:
            raise ValueError(f"{LEVEL_ARG} must be a number in [0, {self.top:g}] (this router's levels: "
                             f"{', '.join(f'{x:g}' for x in self.levels)}); got {value!r}")
        return float(value)

    def rung_index(self, level: float | None) -> int:
        """The highest rung at or below `level` (a checked level); the default for None."""
        if level is None:
            return self.default_rung
        return max(i for i, x in enumerate(self.levels) if x <= level + 1e-9)

    def rung_of(self, params) -> int:
        """The rung of a request with these sampling params (validated on admission)."""
        extra = getattr(params, "extra_args", None) or {}
        return self.rung_index(extra.get(LEVEL_ARG))

    def is_dense(self, block: int) -> bool:
        """No rung routes `block`: it never runs the router."""
        return all(r.is_dense(block) for r in self.rungs)

    def block_logits(self, block: int, rungs: Tensor, present: Sequence[int], *args) -> Tensor:
        """Router logits at `block` (`Router.block_logits` arguments after the block) of tokens of
        the rungs `rungs` [T]; `present` lists the rungs among them.  The rungs share the MLP;
        each token's sparsity input is its own rung's target at the block."""
        if len(present) == 1:
            return self.rungs[present[0]].block_logits(block, *args)
        return self.router.block_logits(block, *args, sparsity=self.sparsity[block].to(rungs.device)[rungs])

    def keep(self, block: int, logits: Tensor, positions: Tensor, prompt_lens: Tensor, rungs: Tensor,
             present: Sequence[int]) -> Tensor:
        """Each token's keep decision by its own rung's rule; `present` lists the rungs among them."""
        keep = None
        for r in present:
            rung_keep = self.rungs[r].keep(block, logits, positions, prompt_lens)
            keep = rung_keep if keep is None else torch.where(rungs == r, rung_keep, keep)
        return keep


@functools.lru_cache(maxsize=8)
def _loaded(path: str, default: float | None) -> Ladder:
    from ftp_vllm.checkpoint import load_ladder

    ladder, _ = load_ladder(path)
    ladder.set_default(default)
    return ladder


def served_ladder(vllm_config) -> Ladder | None:
    """The ladder of an engine's router (`--ftp-router`, default level `--ftp-sparsity`), None
    for a model served stock.  Read in the processes that admit requests, once."""
    hf_config = vllm_config.model_config.hf_config
    path = getattr(hf_config, "ftp_router", None)
    return _loaded(str(path), getattr(hf_config, "ftp_sparsity", None)) if path else None


def check_request_level(vllm_config, params) -> None:
    """ValueError naming the allowed range where a request asks for a level its engine does
    not serve: outside [0, the ladder's top], not a number, or above 0 on a stock model."""
    extra = getattr(params, "extra_args", None) or {}
    if LEVEL_ARG not in extra:
        return
    ladder, value = served_ladder(vllm_config), extra[LEVEL_ARG]
    if ladder is not None:
        ladder.check_level(value)
    elif value != 0 or isinstance(value, bool):
        raise ValueError(f"{LEVEL_ARG} must be 0: this model is served without an FTP router; got {value!r}")


def install_level_check() -> None:
    """Check each request's level where vLLM validates its sampling params (the input
    processor, before the request reaches the engine), so a bad one is the client's error
    (HTTP 400) and never reaches the engine (idempotent)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._validate_params
    if getattr(validate, "ftp_levels", False):
        return

    @functools.wraps(validate)
    def _validate_params(self, params, *args, **kwargs):
        result = validate(self, params, *args, **kwargs)
        try:
            check_request_level(self.vllm_config, params)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter=LEVEL_ARG) from None
        return result

    _validate_params.ftp_levels = True
    InputProcessor._validate_params = _validate_params
