"""`make serve`'s launcher on the real model: OpenAI clients, curl as the README writes it, request
options and prefix-cache hits on prompts long enough to be routed, clean shutdown."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ftp_vllm import server_process

from .conftest import real_prompts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.engine


API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(real_model, tmp_path_factory):
    """`make serve`'s launcher as a user runs it: the default 30% router, vLLM's default
    compiled mode and the launcher's CPU defaults, plus vLLM's `--api-key` and `--dtype float32`.
    The dtype is pinned because tests compare outputs across batches, which only float32 keeps
    equal; the launcher would choose bfloat16 on a CPU that computes it natively.  Requests
    report their prefix-cache hits (`--enable-prompt-tokens-details`), and vLLM's development
    endpoints are on for `POST /reset_prefix_cache`."""
    import requests

    port = server_process.free_port()
    folder = tmp_path_factory.mktemp("serve")
    stats, log = folder / "stats.json", folder / "server.log"
    cmd = [sys.executable, str(ROOT / "serving" / "launch.py"), "--port", str(port), "--api-key", API_KEY,
           "--dtype", "float32", "--enable-prompt-tokens-details", "--ready-timeout", "1800"]
    env = {**os.environ, "FTP_VLLM_STATS": str(stats), "FTP_VLLM_STATS_INTERVAL": "1", "VLLM_SERVER_DEV_MODE": "1"}
    with server_process.running(cmd, f"http://127.0.0.1:{port}", log, env, timeout=1800) as launched:
        deadline = time.monotonic() + 120  # the launcher prints once it has seen /health answer
        while "launch: ready at" not in launched.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "launch: ready at" in launched.log(), launched.log()[-4000:]
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {API_KEY}"
        yield {"port": port, "url": launched.base_url, "proc": launched.proc, "log": log, "stats": stats,
               "http": http}


def routed_prompts(n: int, skip: int = 0) -> list[str]:
    """Real prose of about 130-230 tokens, above the router's min_prompt of 64, so that the
    router routes these prompts (shorter ones are served dense); `skip` picks other texts."""
    return real_prompts(skip + n, words=100)[skip:]


def settled_stats(server) -> dict:
    """`/ftp/stats` once the engine's counters have reached it: two reads 1.5 s apart agree
    (the engine writes them about once a second when they change)."""
    last = None
    for _ in range(40):
        now = server["http"].get(f"{server['url']}/ftp/stats", timeout=10).json()
        if now == last:
            return now
        last = now
        time.sleep(1.5)
    raise AssertionError("the realised-sparsity counters did not settle")


def prompt_sparsity_since(server, before: dict) -> float:
    """The share of prompt token-block computations skipped since `before`."""
    after = settled_stats(server)
    tokens = after["prompt_tokens"] - before["prompt_tokens"]
    assert tokens > 0, "no prompt tokens were computed"
    skipped = sum((a["prompt_total"] - a["prompt_kept"]) - (b["prompt_total"] - b["prompt_kept"])
                  for a, b in zip(after["per_block"], before["per_block"]))
    return skipped / (len(after["per_block"]) * tokens)


def reset_prefix_cache(server) -> None:
    r = server["http"].post(f"{server['url']}/reset_prefix_cache", timeout=60)
    assert r.status_code == 200 and r.json()["success"], r.text


def test_openai_client_completions_chat_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    done = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert "Paris" in done.choices[0].text
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in chat.choices[0].message.content
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == chat.choices[0].message.content


def test_api_key_passes_through_the_launcher(server):
    import requests

    url = f"http://127.0.0.1:{server['port']}/v1/models"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).status_code == 200


def test_readme_curl_examples_work_as_written(server):
    """The README's curl lines, as written (this server also wants the API key)."""
    readme = (ROOT / "README.md").read_text()
    commands = [m.replace("\\\n", " ") for m in re.findall(r"^(curl .+?)(?<!\\)$", readme, flags=re.M | re.S)]
    assert len(commands) >= 3
    for cmd in commands:
        cmd = cmd.replace("127.0.0.1:8000", f"127.0.0.1:{server['port']}")
        auth = ["-H", f"Authorization: Bearer {API_KEY}"]
        out = subprocess.run(shlex.split(cmd) + auth + ["--fail", "--silent", "--show-error"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{cmd}\n{out.stderr}"
        assert '"choices"' in out.stdout or "data: " in out.stdout, out.stdout[:500]


SHIPPED_ROUTER = "smollm2-135m-instruct-dial"  # `make serve`'s default: 30% unless a request says


def test_vllm_serve_with_ftp_router_answers_openai_client(server):
    from openai import OpenAI

    from ftp_vllm.checkpoint import load_checkpoint

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=API_KEY)
    done = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert done.choices[0].text.strip()
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert chat.choices[0].message.content.strip()
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content

    # A prompt-heavy run on held-out text: the server's counters see every prompt
    # token, and the realised prompt sparsity is within 1 point of the router's target.
    from ftp_vllm import texts

    _, config = load_checkpoint(SHIPPED_ROUTER)
    prompts = [" ".join(doc.split()[:380]) for doc in texts.documents("evaluation") if len(doc.split()) >= 380][:16]
    assert len(prompts) == 16
    time.sleep(2)
    before = json.loads(Path(server["stats"]).read_text())
    done = client.completions.create(model="smollm2-135m-instruct", prompt=prompts, max_tokens=1, temperature=0)
    time.sleep(3)  # the counters are written every second
    after = json.loads(Path(server["stats"]).read_text())
    tokens = after["prompt_tokens"] - before["prompt_tokens"]
    assert tokens == done.usage.prompt_tokens > 16 * 300
    skipped = sum((a["prompt_total"] - a["prompt_kept"]) - (b["prompt_total"] - b["prompt_kept"])
                  for a, b in zip(after["per_block"], before["per_block"]))
    realised = skipped / (30 * tokens)
    print(f"realised prompt sparsity on 16 held-out prompts ({tokens} tokens): {realised:.4f}, "
          f"target {config['target_sparsity']}")
    assert abs(realised - config["target_sparsity"]) <= 0.01, realised
    assert "FTP realised sparsity" in Path(server["log"]).read_text()


def test_ftp_endpoints_and_metrics(server):
    base = f"http://127.0.0.1:{server['port']}"
    server["http"].post(f"{base}/v1/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "prompt": "Hello there", "max_tokens": 4}).raise_for_status()
    time.sleep(2)
    router = server["http"].get(f"{base}/ftp/router", timeout=10).json()
    assert router["router"] == SHIPPED_ROUTER and router["base_model"]["num_layers"] == 30
    assert len(router["prompt_sparsity_per_block"]) == 30
    assert router["min_prompt"] == 64 and router["short_prompt_lengths"][0] == 64
    assert "/" not in json.dumps(router), "no file paths in the router description"
    stats = server["http"].get(f"{base}/ftp/stats", timeout=10).json()
    assert stats["prompt_tokens"] > 0 and len(stats["per_block"]) == 30
    assert server["http"].post(f"{base}/ftp/stats", json={}, timeout=10).status_code == 405
    metrics = server["http"].get(f"{base}/metrics", timeout=10).text
    assert "ftp_prompt_sparsity " in metrics and 'ftp_prompt_kept_tokens_total{block="5"}' in metrics
    assert "vllm:" in metrics


MODEL = "smollm2-135m-instruct"


def test_openai_client_options(server):
    """n>1, stop strings, logprobs and echo (prompt logprobs) through the official client, on
    routed prompts: the realised prompt sparsity of these requests is above zero."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key=API_KEY)
    sampled, greedy, scored_prompt, echoed = routed_prompts(4)
    before = settled_stats(server)
    many = client.completions.create(model=MODEL, prompt=sampled, max_tokens=12, n=3, temperature=1.0, seed=7)
    assert len(many.choices) == 3 and len({c.text for c in many.choices}) > 1
    assert many.usage.prompt_tokens >= 64
    full = client.completions.create(model=MODEL, prompt=greedy, max_tokens=16, temperature=0)
    stop = full.choices[0].text.strip()[:4][-1:]  # a character the greedy answer contains
    assert stop
    cut = client.completions.create(model=MODEL, prompt=greedy, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert full.choices[0].text.startswith(cut.choices[0].text)
    scored = client.completions.create(model=MODEL, prompt=scored_prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = scored.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    echo = client.completions.create(model=MODEL, prompt=echoed, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith(echoed)
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == echo.usage.prompt_tokens + 1
    realised = prompt_sparsity_since(server, before)
    print(f"realised prompt sparsity of the option requests: {realised:.4f}")
    assert realised > 0


def level_prompt_sparsity(before: dict, after: dict) -> dict:
    """Per level, the share of prompt token-block computations skipped between two `/ftp/stats`."""
    out = {}
    for b, a in zip(before["levels"], after["levels"]):
        tokens = a["prompt_tokens"] - b["prompt_tokens"]
        if tokens:
            skipped = (a["prompt_sparsity"] or 0) * a["prompt_tokens"] - (b["prompt_sparsity"] or 0) * b["prompt_tokens"]
            out[a["level"]] = (skipped / tokens, tokens)
    return out


def test_each_request_chooses_its_level(server):
    """The sparsity dial through the OpenAI API, on one server: prompts sent at each level of
    the shipped ladder (`vllm_xargs`) realise its prompt sparsity within 1 point, counted per
    level in `/ftp/stats` and the `ftp_level_*` metrics; a level between two rungs gets the
    one below; a bad level is a 400 naming the range, and the server keeps serving."""
    from openai import BadRequestError, OpenAI

    from ftp_vllm import texts

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=API_KEY)
    router = server["http"].get(f"{server['url']}/ftp/router", timeout=10).json()
    assert router["levels"] == [0.0, 0.1, 0.2, 0.3, 0.4] and router["default_level"] == 0.3
    docs = texts.documents("evaluation")
    taken = [d for d in docs if len(d.split()) >= 380][:16]  # the default level's test sends these
    prompts = [" ".join(d.split()[:250]) for d in docs if len(d.split()) >= 250 and d not in taken]
    asked = {0.0: 0.0, 0.1: 0.1, 0.2: 0.25, 0.4: 0.4}  # rung: the level a request names
    before = settled_stats(server)
    for i, (rung, level) in enumerate(asked.items()):
        client.completions.create(model=MODEL, prompt=prompts[5 * i:5 * i + 5], max_tokens=1, temperature=0,
                                  extra_body={"vllm_xargs": {"ftp_sparsity": level}})
    realised = level_prompt_sparsity(before, settled_stats(server))
    print("realised prompt sparsity by level:", realised)
    assert set(realised) == set(asked)
    for rung, (sparsity, tokens) in realised.items():
        assert tokens > 5 * 250 and abs(sparsity - rung) <= 0.01, (rung, sparsity)
    metrics = server["http"].get(f"{server['url']}/metrics", timeout=10).text
    assert 'ftp_level_prompt_sparsity{level="0.1"}' in metrics and 'ftp_level_prompt_tokens_total{level="0.4"}' in metrics
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, extra_body={
        "vllm_xargs": {"ftp_sparsity": 0.2}}, messages=[{"role": "user", "content": "Name a colour."}])
    assert chat.choices[0].message.content.strip()
    for bad in (0.5, -0.1, "fast"):
        for call in (lambda x: client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=x),
                     lambda x: client.chat.completions.create(model=MODEL, max_tokens=2, extra_body=x,
                                                              messages=[{"role": "user", "content": "Hi"}])):
            with pytest.raises(BadRequestError, match=r"ftp_sparsity must be a number in \[0, 0.4\]"):
                call({"vllm_xargs": {"ftp_sparsity": bad}})
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_bad_input_gets_4xx_and_server_keeps_serving(server):
    url = f"http://127.0.0.1:{server['port']}/v1/completions"
    good = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    reference = server["http"].post(url, json=good, timeout=120).json()["choices"][0]["text"]
    long_prompt = list(range(100, 100 + 9000))  # token ids: longer than the 8,192-token context
    bad = {
        "malformed JSON": dict(data=b'{"model": "x", "prompt": ', headers={"Content-Type": "application/json"}),
        "invalid UTF-8": dict(data=b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe\xfd"}',
                              headers={"Content-Type": "application/json"}),
        "prompt longer than the context": dict(json={**good, "prompt": long_prompt}),
        "negative max_tokens": dict(json={**good, "max_tokens": -5}),
        "huge max_tokens": dict(json={**good, "max_tokens": 10**9}),
        "unknown model": dict(json={**good, "model": "no-such-model"}),
    }
    for what, kwargs in bad.items():
        r = server["http"].post(url, timeout=120, **kwargs)
        assert 400 <= r.status_code < 500 and r.status_code != 401, f"{what}: {r.status_code} {r.text[:300]}"
        assert r.text.strip(), f"{what}: empty error body"
        again = server["http"].post(url, json=good, timeout=120)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == reference, what


def assert_same_greedy_output(alone: dict, among: dict, near_tie: float = 0.05) -> None:
    """Greedy tokens of a request served alone and among others (OpenAI `logprobs` objects with
    top-2) are the same, or part only where the alone run's two best tokens were within
    `near_tie` nats: float32 sums in another batch round differently, by about 1e-5, and a
    near-tie may then go either way.  Up to there the logprobs agree to 1e-3."""
    a, b = alone["tokens"], among["tokens"]
    if a == b:
        return
    k = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    best = sorted(alone["top_logprobs"][k].values(), reverse=True)
    print(f"outputs part at token {k}: {a[k]!r} alone, {b[k]!r} among others; alone's top-2 {best}")
    assert all(abs(x - y) < 1e-3 for x, y in zip(alone["token_logprobs"][:k], among["token_logprobs"][:k]))
    assert b[k] in alone["top_logprobs"][k] and best[0] - best[1] < near_tie, "not a near-tie: the outputs differ"


def test_disconnect_and_cancel_leave_other_requests_intact(server):
    """A client that drops a stream and one that cancels a request in flight: the server keeps
    serving and concurrent routed requests, each at a level of its own (the dial), get the same
    output as when sent alone (up to float32 near-ties, `assert_same_greedy_output`)."""
    import asyncio

    from openai import AsyncOpenAI

    base = f"{server['url']}/v1"
    *prompts, dropped, cancelled = routed_prompts(6, skip=4)
    levels = [{"vllm_xargs": {"ftp_sparsity": x}} for x in (0.0, 0.1, 0.4)] + [{}]  # the last: the default
    alone = [server["http"].post(f"{base}/completions", timeout=120, json={
        "model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "logprobs": 2, **level}).json()["choices"][0]
        for p, level in zip(prompts, levels)]
    reset_prefix_cache(server)  # the concurrent requests compute their prompts again, routed in one batch
    before = settled_stats(server)

    # dropped stream: read a few chunks, then close the connection
    with server["http"].post(f"{base}/completions", stream=True, timeout=120, json={
            "model": MODEL, "prompt": dropped, "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(3)]

    async def run():
        client = AsyncOpenAI(base_url=base, api_key=API_KEY, max_retries=0)
        doomed = asyncio.create_task(client.completions.create(
            model=MODEL, prompt=cancelled, max_tokens=400, extra_body={"ignore_eos": True}))
        others = [asyncio.create_task(client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                                                logprobs=2, extra_body=level))
                  for p, level in zip(prompts, levels)]
        await asyncio.sleep(1.0)
        doomed.cancel()
        return await asyncio.gather(*others)

    together = asyncio.run(run())
    for one, among in zip(alone, together):
        assert_same_greedy_output(one["logprobs"], among.choices[0].logprobs.model_dump())
    assert all(c.usage.prompt_tokens >= 64 for c in together)
    realised = prompt_sparsity_since(server, before)
    assert realised > 0
    health = server["http"].get(f"{server['url']}/health", timeout=30)
    assert health.status_code == 200


def test_prefix_cache_reuse_is_exact_and_kept_where_it_is(server, real_model):
    """A and B share a 384-token prefix (several KV blocks); A is longer.  B after A answers as
    B alone: a routed token's decisions depend on its prompt's length, so the engine does not
    hand B the K/V A computed (`ftp_vllm.prefix_cache`).  C, of B's length with the same
    prefix, takes that prefix from B's cache and answers as C alone."""
    from transformers import AutoTokenizer

    from ftp_vllm import texts

    tok = AutoTokenizer.from_pretrained(real_model)
    docs = [tok(doc).input_ids for doc in texts.documents("evaluation")]
    docs = [ids for ids in docs if len(ids) >= 400][:4]
    prefix = docs[0][:384]
    prompt_a, prompt_b, prompt_c = prefix + docs[1][200:300], prefix + docs[2][200:264], prefix + docs[3][200:264]
    assert len(prompt_a) > len(prompt_b) == len(prompt_c)
    url = f"{server['url']}/v1/completions"

    def complete(prompt):
        r = server["http"].post(url, timeout=300, json={"model": MODEL, "prompt": prompt, "max_tokens": 32,
                                                        "temperature": 0, "logprobs": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["logprobs"]["tokens"], body["usage"]["prompt_tokens_details"]["cached_tokens"]

    alone = {}
    for name, prompt in (("C", prompt_c), ("B", prompt_b)):
        reset_prefix_cache(server)
        alone[name], cached = complete(prompt)
        assert cached == 0
    reset_prefix_cache(server)
    before = settled_stats(server)
    _, cached = complete(prompt_a)
    assert cached == 0
    realised = prompt_sparsity_since(server, before)
    print(f"realised prompt sparsity of A: {realised:.4f}")
    assert realised > 0
    after_a, cached = complete(prompt_b)
    assert cached == 0, "B must not take the K/V computed for A's length"
    assert after_a == alone["B"]
    after_b, cached = complete(prompt_c)
    print(f"C after B: {cached} of {len(prompt_c)} prompt tokens from the cache")
    assert 256 <= cached <= len(prefix), cached
    assert after_b == alone["C"]


def test_lm_eval_local_completions_loglikelihood(server, real_model, tmp_path):
    """lm-eval's `local-completions` model scores a small local multiple-choice task (held-out
    next-sentence cloze items) by log-likelihood through the FTP server's prompt logprobs."""
    from transformers import AutoTokenizer

    from ftp_vllm import texts
    from ftp_vllm.evaluation import cloze_items

    tok = AutoTokenizer.from_pretrained(real_model)
    items = cloze_items(tok, texts.documents("evaluation"), 40, seed=1)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"context": tok.decode(i.context), "choices": [tok.decode(c) for c in i.candidates],
                                        "label": i.answer}) + "\n" for i in items))
    (tmp_path / "ftp_cloze.yaml").write_text(f"""task: ftp_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    base = f"http://127.0.0.1:{server['port']}/v1/completions"
    out = tmp_path / "out"
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "local-completions",
         "--model_args", f"model={MODEL},base_url={base},tokenizer={real_model},tokenizer_backend=huggingface,"
                         "num_concurrent=4,max_retries=1",
         "--tasks", "ftp_cloze", "--include_path", str(tmp_path), "--output_path", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    acc = results["results"]["ftp_cloze"]["acc,none"]
    print(f"lm-eval ftp_cloze acc over {len(items)} items: {acc:.3f}")
    assert results["n-samples"]["ftp_cloze"]["effective"] == len(items) == 40
    assert acc > 0.25 + 0.1, "above chance by a margin: the log-likelihoods carry signal"


def test_sigterm_stops_server_and_engine(server):
    """Last in this module: it ends the server."""
    proc = server["proc"]
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the launcher should run vllm serve as its child"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) is not None
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"left running: {[p.pid for p in alive]}"
