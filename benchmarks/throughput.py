"""Offline throughput of stock vLLM and FTP on the same model, settings and cores.

    python benchmarks/throughput.py --json results/throughput.json

Methods: `dense` (the stock model), `ftp-keep-all` (the FTP class with a router
whose thresholds keep every token: the routing overhead alone), `ftp` with each
`--routers` router (a ladder checkpoint: each of its levels, `NAME@0.2` one of
them, served as the engine's default level), `ftp-simple` (the first router with attention for every
token: the routed layers' simple path; not run by default), and `shortgpt`
(the model with round(s * B) blocks of lowest Block Influence removed, s the
first router's target) - each in its own engine process, all of one mode alive
at once, so that the workloads run interleaved: every repetition runs every
method on the workload before the next workload starts.  Modes run one after
the other (engines of both may not fit in memory).  `--restart` starts fresh
engines for every repetition, so that what an engine process got at start
averages out over repetitions too.
Workloads (`vllm bench throughput` style; real text, token ids of exact
lengths, `ignore_eos`):

  prompt-heavy   32 prompts x 512 tokens, 1 output token
  decode-heavy   32 prompts x 64 tokens, 256 output tokens
  mixed          32 prompts, lengths 64..512, outputs 16..128 (seeded)

Figures are medians over `--repeats`; ratio_to_dense divides by the dense run
of the same workload and mode (medians), and ratio_by_repeat pairs each
repetition with the dense run of the same repetition (with its median).  Every method runs in each of `--modes`:
`eager` (`--enforce-eager`) and `compiled` (vLLM's default; a step that routes
runs the routed blocks as an opaque op inside vLLM's graph, a step that routes
nowhere a second graph of stock blocks).  Prefix caching is off, so every
repetition computes every prompt.  The ideal speed-up is a FLOP count of what
a skipped token does not compute, with the realised per-block keep rates of
the run (read from the engine's counters): a kept
token costs its block's projections, MLP and attention over its context; a
skipped one costs its K/V projections only; the LM head runs for sampled
positions.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from ftp_vllm.engine_process import EngineProcess

WORKLOADS = ("prompt-heavy", "decode-heavy", "mixed")
METHODS = ("dense", "ftp-keep-all", "ftp", "ftp-simple", "shortgpt")


# ---- workloads ----------------------------------------------------------------

def workload(name: str, tokenizer, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) per request."""
    from ftp_vllm import texts

    ids = tokenizer(" ".join(texts.documents("evaluation")), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def prompt(n):
        start = rng.randrange(len(ids) - n)
        return ids[start:start + n]

    if name == "prompt-heavy":
        return [(prompt(512), 1) for _ in range(32)]
    if name == "decode-heavy":
        return [(prompt(64), 256) for _ in range(32)]
    if name == "mixed":
        return [(prompt(rng.randint(64, 512)), rng.randint(16, 128)) for _ in range(32)]
    raise ValueError(name)


def workload_inputs(name: str, tokenizer) -> tuple[list[dict], list]:
    """The workload as `LLM.generate` takes it: prompts and greedy sampling params (`ignore_eos`)."""
    from vllm import SamplingParams

    requests = workload(name, tokenizer)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    return [{"prompt_token_ids": ids} for ids, _ in requests], params


# ---- engine settings -------------------------------------------------------------

def engine_args(folder, dtype: str | None = None) -> dict:
    """`LLM` arguments every method runs with (add `enforce_eager`); dtype by default bfloat16
    where native (GPU, AVX-512 BF16, AMX), else float32.  Prefix caching is off: every
    repetition computes every prompt."""
    from ftp_vllm.engine_process import ENGINE_DEFAULTS
    from ftp_vllm.hardware import has_gpu, native_bf16

    dtype = dtype or ("bfloat16" if has_gpu() or native_bf16() else "float32")
    return {"model": str(folder), "tokenizer": str(folder), "dtype": dtype, **ENGINE_DEFAULTS,
            "max_model_len": 2048, "enable_prefix_caching": False}


def routed_overrides(router_path, level: float | None = None) -> dict:
    """`LLM` arguments that serve the FTP class with a router checkpoint (at `level` of a ladder)."""
    overrides = {"architectures": ["FTPLlamaForCausalLM"], "ftp_router": str(router_path)}
    return {"hf_overrides": overrides if level is None else {**overrides, "ftp_sparsity": level}}


def keep_all_router(name, model_folder, out: Path, level: float | None = None) -> Path:
    """Router `name` (at `level` of a ladder) with thresholds that keep every token (the
    routing overhead alone), saved at `out`."""
    from ftp_vllm.checkpoint import fingerprint, load_checkpoint, save_checkpoint

    router, _ = load_checkpoint(name, level)
    router.keep_every_token()
    return save_checkpoint(out, router, {"base_model": fingerprint(model_folder)})


def router_target(name, level: float | None = None) -> float:
    """The target sparsity router `name` (at `level` of a ladder) was made for."""
    from ftp_vllm.checkpoint import load_checkpoint

    return load_checkpoint(name, level)[1]["target_sparsity"]


def shortgpt_model(folder, tokenizer, sparsity: float, out: Path) -> tuple[Path, list[int]]:
    """The model without its round(sparsity * B) blocks of lowest Block Influence on
    calibration text, saved at `out`, and those blocks."""
    from ftp_vllm.baselines import calibration_block_influence, shortgpt_blocks
    from ftp_vllm.model_store import write_pruned_model
    from ftp_vllm.reference import RoutedModel

    model = RoutedModel.from_pretrained(folder)
    dropped = shortgpt_blocks(calibration_block_influence(model, tokenizer), round(sparsity * model.num_blocks))
    del model  # before the copy: both need memory
    return write_pruned_model(folder, dropped, out), dropped


# ---- methods ---------------------------------------------------------------------

@dataclass
class MethodSpec:
    """A method as one engine runs it: its row of the results and its engine's settings."""

    method: str  # dense, ftp-keep-all, ftp, ftp-simple or shortgpt
    router: str | None = None  # the router's name, where the results name one
    llm: dict = field(default_factory=dict)  # `LLM` arguments over the common ones
    env: dict = field(default_factory=dict)  # the engine process's environment
    dropped_blocks: list[int] | None = None  # shortgpt's removed blocks
    mode: str = "eager"  # or compiled

    @property
    def name(self) -> str:
        """Unique within a run: labels its runs and its engine's log."""
        return " ".join(filter(None, (self.method, self.router, None if self.mode == "eager" else self.mode)))

    @property
    def routed(self) -> bool:
        """Runs the FTP class, whose counters give the realised keep rates."""
        return self.method.startswith("ftp")

    def engine_args(self, common: dict) -> dict:
        return {**common, "enforce_eager": self.mode == "eager", **self.llm}


def method_specs(args, folder, tokenizer, work: Path) -> list[MethodSpec]:
    """`--methods` in each of `--modes`, a mode's methods together; routers and the pruned
    model they need are written under `work`."""
    from ftp_vllm.checkpoint import resolve_router, router_label, router_levels

    routers = router_levels(args.routers)  # a ladder: each of its levels, served as the server's default
    methods = []
    if "dense" in args.methods:
        methods.append(MethodSpec("dense"))
    if "ftp-keep-all" in args.methods:
        methods.append(MethodSpec("ftp-keep-all", llm=routed_overrides(
            keep_all_router(routers[0][0], folder, work / "keep-all", routers[0][1]))))
    if "ftp" in args.methods:
        methods += [MethodSpec("ftp", router_label(name, level), routed_overrides(resolve_router(name), level))
                    for name, level in routers]
    if "ftp-simple" in args.methods:  # the first router on the simple path (attention for every token)
        name, level = routers[0]
        methods.append(MethodSpec("ftp-simple", router_label(name, level), routed_overrides(resolve_router(name), level),
                                  {"FTP_VLLM_PATH": "simple"}))
    if "shortgpt" in args.methods and routers:  # as many blocks as the first router's target
        path, dropped = shortgpt_model(folder, tokenizer, router_target(*routers[0]), work / "shortgpt")
        methods.append(MethodSpec("shortgpt", llm={"model": str(path)}, dropped_blocks=dropped))
    return [replace(m, mode=mode) for mode in args.modes for m in methods]


# ---- engine-process jobs (`ftp_vllm.engine_process`) ------------------------------

@functools.cache
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def timed_generate(llm, workload: str, tokenizer: str, routed: bool) -> dict:
    """One timed `generate` of the workload, after a warm-up on four of its prompts; with
    `routed`, the keep rates of the timed run."""
    prompts, params = workload_inputs(workload, _tokenizer(tokenizer))
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    before = _stats(llm) if routed else None
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    after = _stats(llm) if routed else None
    return {"wall_s": wall, "requests": len(prompts), "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "keep_rates": _keep_rates(before, after)}


def serving_steps(llm, tokenizer: str, prompt_tokens: int, running: int = 16) -> dict:
    """Median ms of decode-only engine steps with `running` requests, and of steps that also
    take a new prompt's `prompt_tokens` tokens (prompts of the prompt-heavy workload)."""
    from vllm import SamplingParams

    token_ids = [p["prompt_token_ids"] for p in workload_inputs("prompt-heavy", _tokenizer(tokenizer))[0]]
    engine = llm.llm_engine
    tag = time.monotonic_ns()  # request ids of this call
    for i in range(running):
        engine.add_request(f"running-{tag}-{i}", {"prompt_token_ids": token_ids[i][:100]},
                           SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))

    def step() -> float:
        start = time.perf_counter()
        engine.step()
        return 1e3 * (time.perf_counter() - start)

    for _ in range(6):  # their prompts, then steady decoding
        step()
    decode, with_prompt = [], []
    for k in range(8):
        decode += [step() for _ in range(4)]
        engine.add_request(f"new-{tag}-{k}", {"prompt_token_ids": token_ids[running + k][:prompt_tokens]},
                           SamplingParams(max_tokens=1))
        with_prompt.append(step())
    engine.abort_request([f"running-{tag}-{i}" for i in range(running)])
    while engine.has_unfinished_requests():
        engine.step()
    return {"decode_ms": statistics.median(decode), "with_prompt_ms": statistics.median(with_prompt),
            "decode_all": [round(t, 1) for t in decode], "with_prompt_all": [round(t, 1) for t in with_prompt]}


def _stats(llm):
    """The FTP counters of the engine's model (same process: one engine, one worker)."""
    return llm.apply_model(lambda model: model.ftp.stats())[0]


def _keep_rates(before, after):
    """Per block (prompt kept share, decode kept share) over this run, from the FTP counters."""
    if not after:
        return None
    rows = []
    for a, b in zip(after["per_block"], before["per_block"] if before else [None] * len(after["per_block"])):
        d = {k: a[k] - (b[k] if b else 0) for k in ("prompt_kept", "prompt_total", "decode_kept", "decode_total")}
        rows.append((d["prompt_kept"] / d["prompt_total"] if d["prompt_total"] else 1.0,
                     d["decode_kept"] / d["decode_total"] if d["decode_total"] else 1.0))
    return rows


def start_engine(stack: ExitStack, spec: MethodSpec, common: dict, log: Path) -> EngineProcess:
    """`spec`'s engine in a process of its own, closed with `stack`."""
    engine = stack.enter_context(EngineProcess(log))
    engine.start(spec.engine_args(common), spec.env)
    return engine


# ---- FLOP model ---------------------------------------------------------------------

def ideal_speedup(config: dict, requests: list[tuple[list[int], int]], keep_rates, layers: int | None = None) -> float:
    """Dense FLOPs / routed FLOPs for the workload, with per-block keep rates (prompt, decode)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim") or h // heads
    vocab, blocks = config["vocab_size"], config["num_hidden_layers"]
    kv_proj = 2 * h * kv * d
    rest = h * heads * d + heads * d * h + 3 * h * inter  # q, o, MLP

    def cost(rates, n_blocks):
        total = 0.0
        for prompt, out in requests:
            n_in = len(prompt)
            ctx_prompt = n_in * (n_in + 1) / 2  # summed context lengths of prompt tokens
            ctx_decode = sum(n_in + i for i in range(out - 1))
            for b in range(n_blocks):
                kp, kd = rates[b] if rates else (1.0, 1.0)
                total += kv_proj * (n_in + out - 1)
                total += kp * (rest * n_in + 2 * heads * d * ctx_prompt)
                total += kd * (rest * (out - 1) + 2 * heads * d * ctx_decode)
            total += vocab * h * out
        return total

    return cost(None, blocks) / cost(keep_rates, layers if layers is not None else blocks)


# ---- run, summarise, write ---------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", nargs="*", default=["smollm2-135m-instruct-s20", "smollm2-135m-instruct-s30",
                                                    "smollm2-135m-instruct-s40"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--methods", nargs="+", default=["dense", "ftp-keep-all", "ftp", "shortgpt"], choices=METHODS)
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                   help="eager (--enforce-eager) and/or vLLM's default compiled mode; every method runs in each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--restart", action="store_true",
                   help="fresh engines for every repetition: an engine keeps what it got at start (memory "
                        "placement, for one) for as long as it lives, which repeating on one engine does not average")
    p.add_argument("--dtype", default=None, help="default: bfloat16 where native (GPU, AVX-512 BF16, AMX), else float32")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot", help="PNG path (default: next to --json)")
    return p.parse_args(argv)


def run(specs: list[MethodSpec], common: dict, workloads: list[str], repeats: int, restart: bool,
        work: Path) -> dict[tuple[str, str], list[dict]]:
    """Every method's timed runs, by (workload, method name), one per repetition.  A mode's
    engines are alive together (all of them at once may not fit in memory) and take turns
    on each workload, in the opposite order every other repetition."""
    from tqdm.auto import tqdm

    runs: dict[tuple[str, str], list[dict]] = {}
    print(f"engine logs in {work}", flush=True)
    for mode in dict.fromkeys(s.mode for s in specs):
        group = [s for s in specs if s.mode == mode]
        lifetimes = [[rep] for rep in range(repeats)] if restart else [list(range(repeats))]
        with tqdm(total=repeats * len(workloads) * len(group), desc=f"{mode} runs") as bar:
            for reps in lifetimes:
                with ExitStack() as stack:
                    engines = {s.name: start_engine(stack, s, common,
                                                    work / (re.sub(r"[^\w.-]+", "_", s.name) + f"-{reps[0]}.log"))
                               for s in tqdm(group, desc=f"{mode} engines", leave=False)}
                    for rep in reps:
                        for wl in workloads:
                            for s in group if rep % 2 == 0 else group[::-1]:
                                runs.setdefault((wl, s.name), []).append(engines[s.name].run(
                                    timed_generate, workload=wl, tokenizer=common["tokenizer"], routed=s.routed))
                                bar.update(1)
    return runs


def result_row(spec: MethodSpec, name: str, requests: list[tuple[list[int], int]], runs: list[dict],
               config: dict) -> dict:
    """A method's figures on workload `name` (its `requests`): throughput from the median wall,
    sparsity and ideal speed-up."""
    wall = statistics.median(r["wall_s"] for r in runs)
    r0 = runs[0]
    row = {"workload": name, "method": spec.method, "router": spec.router, "mode": spec.mode,
           "requests_per_s": r0["requests"] / wall,
           "total_tok_per_s": (r0["prompt_tokens"] + r0["output_tokens"]) / wall,
           "prompt_tok_per_s": r0["prompt_tokens"] / wall,
           "output_tok_per_s": r0["output_tokens"] / wall,
           "wall_s_runs": [round(r["wall_s"], 3) for r in runs]}
    rates = runs[-1]["keep_rates"]
    if spec.method == "shortgpt":
        blocks = config["num_hidden_layers"]
        row["sparsity"] = len(spec.dropped_blocks) / blocks
        row["ideal_speedup"] = ideal_speedup(config, requests, None, blocks - len(spec.dropped_blocks))
        row["dropped_blocks"] = spec.dropped_blocks
    elif rates:
        p_tok = sum(len(p) for p, _ in requests)
        d_tok = sum(o - 1 for _, o in requests)
        skipped = sum((1 - kp) * p_tok + (1 - kd) * d_tok for kp, kd in rates)
        row["sparsity"] = skipped / (len(rates) * (p_tok + d_tok)) if requests else 0.0
        row["prompt_sparsity"] = sum(1 - kp for kp, _ in rates) / len(rates)
        row["decode_sparsity"] = sum(1 - kd for _, kd in rates) / len(rates)
        row["ideal_speedup"] = ideal_speedup(config, requests, rates)
    else:
        row["sparsity"] = 0.0
        row["ideal_speedup"] = 1.0
    return row


def add_ratios(rows: list[dict], workload: str) -> None:
    """Each row of one workload against the dense row of its mode (and of eager): by medians
    and paired by repetition, on the workload's own metric."""
    metric = ("prompt_tok_per_s" if workload == "prompt-heavy" else
              "output_tok_per_s" if workload == "decode-heavy" else "total_tok_per_s")
    dense_of = {row["mode"]: row for row in rows if row["method"] == "dense"}
    for row in rows:
        if row["mode"] in dense_of:
            dense = dense_of[row["mode"]]
            row["ratio_to_dense"] = row[metric] / dense[metric]
            # paired by repetition (same workload, same tokens: the ratio of walls), which a machine
            # drifting between repetitions moves less than the ratio of medians
            row["ratio_by_repeat"] = [round(d / w, 4) for d, w in zip(dense["wall_s_runs"], row["wall_s_runs"])]
            row["ratio_median_of_repeats"] = statistics.median(row["ratio_by_repeat"])
        if "eager" in dense_of and row["mode"] != "eager":
            row["ratio_to_dense_eager"] = row[metric] / dense_of["eager"][metric]
        row["ratio_metric"] = metric
        if "ratio_to_dense" in row and row.get("ideal_speedup"):
            row["achieved_over_ideal"] = row["ratio_to_dense"] / row["ideal_speedup"]


def summarise(specs: list[MethodSpec], runs: dict, workloads: list[str], config: dict, tokenizer) -> list[dict]:
    """One row per workload and method (workloads in order, methods as `specs` lists them)."""
    results = []
    for wl in workloads:
        requests = workload(wl, tokenizer)
        rows = [result_row(s, wl, requests, runs[(wl, s.name)], config) for s in specs]
        add_ratios(rows, wl)
        results += rows
    return results


def write(results: list[dict], args: argparse.Namespace, common: dict, argv=None) -> None:
    """The results and settings as JSON at `--json` (with a plot beside it unless `--plot` says
    where), or the plot alone at `--plot`."""
    out = {"results": results, "settings": {"model": args.model, "dtype": common["dtype"], "repeats": args.repeats,
                                            "restart": args.restart,
                                            "engine": {k: v for k, v in common.items() if k not in ("model", "tokenizer")},
                                            "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
           "command": " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
        plot(results, Path(args.plot or Path(args.json_out).with_suffix(".png")))
    elif args.plot:
        plot(results, Path(args.plot))


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from ftp_vllm.model_store import resolve_model

    folder = resolve_model(args.model)
    config = json.loads((Path(folder) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    work = Path(tempfile.mkdtemp(prefix="ftp-throughput-"))
    common = engine_args(folder, args.dtype)
    specs = method_specs(args, folder, tokenizer, work)
    runs = run(specs, common, args.workloads, args.repeats, args.restart, work)
    results = summarise(specs, runs, args.workloads, config, tokenizer)
    print_table(results)
    write(results, args, common, argv)
    return 0


def print_table(results: list[dict]) -> None:
    print("\n| workload | method | router | mode | sparsity % | req/s | total tok/s | output tok/s | ratio to dense (same mode) "
          "| by repetition (median) | ideal | achieved/ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        paired = ", ".join(f"{x:.3f}" for x in r.get("ratio_by_repeat", []))
        print(f"| {r['workload']} | {r['method']} | {r['router'] or ''} | {r['mode']} | {100 * r['sparsity']:.1f} | "
              f"{r['requests_per_s']:.2f} | {r['total_tok_per_s']:.0f} | {r['output_tok_per_s']:.1f} | "
              f"{r.get('ratio_to_dense', float('nan')):.3f} | {paired} ({r.get('ratio_median_of_repeats', float('nan')):.3f}) | "
              f"{r.get('ideal_speedup', float('nan')):.2f} | "
              f"{r.get('achieved_over_ideal', float('nan')):.2f} |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    labels = list(dict.fromkeys(f"{r['method']}{' ' + r['router'].rsplit('-', 1)[-1] if r['router'] else ''} ({r['mode']})"
                                for r in results))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        vals = []
        for wl in workloads:
            row = next((r for r in results if r["workload"] == wl and
                        f"{r['method']}{' ' + r['router'].rsplit('-', 1)[-1] if r['router'] else ''} ({r['mode']})" == label), None)
            vals.append(row.get("ratio_to_dense", 0) if row else 0)
        ax.bar([w + i * width for w in range(len(workloads))], vals, width, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads)
    ax.set_ylabel("throughput / stock vLLM (same mode)")
    ax.set_title("Offline throughput relative to stock vLLM, same model and settings")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
