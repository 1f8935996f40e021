"""Prefix caching that stays exact under routing.

vLLM reuses a cached KV block when its token ids and those of every block before it match,
and the request's `cache_salt` with them.  A routed token's decisions depend on its
request's tokens up to it and on one thing more: the prompt's length (the position feature
is relative to it, and short prompts have thresholds of their own).  K/V computed for a
prompt of one length are therefore not the K/V of a prompt of another length, even where
the tokens agree.  So the engine salts every request whose computation routing changes with
its prompt length: such requests share cached blocks exactly when the result is the same
(a repeated prompt, prompts of equal length with a common prefix), and requests that
routing leaves dense share with each other as in stock vLLM.
"""

from __future__ import annotations

import functools


def routing_salt(prompt_len: int, min_prompt: int, routes_prompts: bool, routes_decode: bool) -> str | None:
    """The salt for a request with a prompt of `prompt_len` tokens, None where its K/V are
    stock vLLM's (nothing of it is routed)."""
    if (routes_prompts and prompt_len >= min_prompt) or routes_decode:
        return f"ftp-prompt-{prompt_len}"
    return None


def salted(user_salt: str | None, salt: str | None) -> str | None:
    """A user's own `cache_salt` kept, with routing's added."""
    if salt is None:
        return user_salt
    return salt if not user_salt else f"{user_salt}|{salt}"


@functools.lru_cache(maxsize=8)
def router_salt_rule(path: str) -> tuple[int, bool, bool]:
    """(min_prompt, routes prompts, routes decode tokens) of a router checkpoint."""
    from ftp_vllm.checkpoint import load_checkpoint

    router, _ = load_checkpoint(path)
    targets = [router.targets(b) for b in range(router.num_blocks)]
    return router.min_prompt, any(p > 0 for p, _ in targets), any(d > 0 for _, d in targets)


def request_salt(vllm_config, prompt_len: int) -> str | None:
    """The salt routing adds to a request of this engine, None for a model served stock."""
    path = getattr(vllm_config.model_config.hf_config, "ftp_router", None)
    if not path:
        return None
    return routing_salt(prompt_len, *router_salt_rule(str(path)))


def install_cache_salt() -> None:
    """Salt each request as the engine core admits it (`EngineCore.preprocess_add_request`,
    the one door for the offline engine and the server alike), before its block hashes exist."""
    from vllm.v1.engine.core import EngineCore

    admit = EngineCore.preprocess_add_request
    if getattr(admit, "ftp_salts", False):
        return

    @functools.wraps(admit)
    def preprocess_add_request(self, request):
        ids, embeds = request.prompt_token_ids, request.prompt_embeds
        prompt_len = len(ids) if ids is not None else (embeds.shape[0] if embeds is not None else 0)
        request.cache_salt = salted(request.cache_salt, request_salt(self.vllm_config, prompt_len))
        return admit(self, request)

    preprocess_add_request.ftp_salts = True
    EngineCore.preprocess_add_request = preprocess_add_request
