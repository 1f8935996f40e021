"""Prefix caching that stays exact under routing.

vLLM reuses a cached KV block when its token ids and those of every block before it match,
and the request's `cache_salt` with them.  A routed token's decisions depend on its
request's tokens up to it and on one thing more: the prompt's length (the position feature
is relative to it, and short prompts have thresholds of their own).  K/V computed for a
prompt of one length are therefore not the K/V of a prompt of another length, even where
the tokens agree, and neither are those computed at another level of the router's ladder
(`ftp_vllm.ladder`).  So the engine salts every request whose computation routing changes
with its level and prompt length: such requests share cached blocks exactly when the
result is the same (a repeated prompt, prompts of equal length with a common prefix, at
one level), and requests that routing leaves dense (short prompts, level 0) share with
each other as in stock vLLM.
"""

from __future__ import annotations

import functools


def routing_salt(prompt_len: int, min_prompt: int, routes_prompts: bool, routes_decode: bool,
                 level: float) -> str | None:
    """The salt for a request with a prompt of `prompt_len` tokens served at a ladder rung of
    this `level` that routes prompts and/or decode tokens; None where its K/V are stock vLLM's
    (nothing of it is routed: a short prompt, or the dense rung)."""
    if (routes_prompts and prompt_len >= min_prompt) or routes_decode:
        return f"ftp-{level:g}-prompt-{prompt_len}"
    return None


def salted(user_salt: str | None, salt: str | None) -> str | None:
    """A user's own `cache_salt` kept, with routing's added."""
    if salt is None:
        return user_salt
    return salt if not user_salt else f"{user_salt}|{salt}"


def request_salt(vllm_config, prompt_len: int, params=None) -> str | None:
    """The salt routing adds to a request of this engine with these sampling params (which
    name its level, `ftp_vllm.ladder`), None for a model served stock."""
    from ftp_vllm.ladder import served_ladder

    ladder = served_ladder(vllm_config)
    if ladder is None:
        return None
    rung = ladder.rung_of(params)
    return routing_salt(prompt_len, ladder.router.min_prompt, ladder.routes_prompts[rung], ladder.routes_decode[rung],
                        ladder.levels[rung])


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
        salt = request_salt(self.vllm_config, prompt_len, request.sampling_params)
        request.cache_salt = salted(request.cache_salt, salt)
        return admit(self, request)

    preprocess_add_request.ftp_salts = True
    EngineCore.preprocess_add_request = preprocess_add_request
