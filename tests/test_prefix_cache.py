"""Which requests routing salts for vLLM's prefix cache, and that the engine applies it."""

from ftp_vllm.prefix_cache import install_cache_salt, request_salt, routing_salt, salted


def test_routed_prompts_are_salted_by_their_length():
    assert routing_salt(300, 64, routes_prompts=True, routes_decode=False, level=0.3) == "ftp-0.3-prompt-300"
    assert routing_salt(301, 64, True, False, 0.3) != routing_salt(300, 64, True, False, 0.3)
    assert routing_salt(300, 64, True, False, 0.2) != routing_salt(300, 64, True, False, 0.3)  # another level
    assert routing_salt(64, 64, True, False, 0.3) is not None


def test_requests_routing_leaves_dense_share_with_stock():
    assert routing_salt(63, 64, True, False, 0.3) is None  # under min_prompt: served dense
    assert routing_salt(500, 64, False, False, 0.0) is None  # a rung with nothing to route: level 0


def test_routed_decode_tokens_salt_every_request():
    """Cached blocks hold generated tokens too: where those were routed, a later prompt that
    contains them must not take their K/V."""
    assert routing_salt(10, 64, True, True, 0.3) == "ftp-0.3-prompt-10"


def test_a_users_own_salt_is_kept():
    assert salted("tenant-7", "ftp-0.3-prompt-300") == "tenant-7|ftp-0.3-prompt-300"
    assert salted("tenant-7", None) == "tenant-7"
    assert salted(None, "ftp-0.3-prompt-300") == "ftp-0.3-prompt-300"


class Config:
    def __init__(self, router):
        self.model_config = type("M", (), {"hf_config": type("H", (), {"ftp_router": router, "ftp_sparsity": None})()})()


def test_request_salt_reads_the_engines_router():
    assert request_salt(Config(None), 500) is None  # stock model
    assert request_salt(Config("smollm2-135m-instruct-s30"), 500) == "ftp-0.3-prompt-500"
    assert request_salt(Config("smollm2-135m-instruct-s30"), 20) is None


def test_engine_core_salts_requests_as_it_admits_them(monkeypatch):
    from vllm.v1.engine.core import EngineCore

    seen = []
    monkeypatch.setattr(EngineCore, "preprocess_add_request", lambda self, request: seen.append(request.cache_salt))
    install_cache_salt()
    install_cache_salt()  # idempotent: one wrap
    core = EngineCore.__new__(EngineCore)
    core.vllm_config = Config("smollm2-135m-instruct-s30")
    for ids, salt in (([1] * 200, "user"), ([1] * 20, None)):
        request = type("R", (), {"prompt_token_ids": ids, "prompt_embeds": None, "cache_salt": salt,
                                 "sampling_params": None})()
        core.preprocess_add_request(request)
    assert seen == ["user|ftp-0.3-prompt-200", None]
