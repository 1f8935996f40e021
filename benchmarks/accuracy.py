"""Accuracy of FTP routers against the dense model and baselines at matched sparsity.

    python benchmarks/accuracy.py --json results/accuracy.json

For the dense model, each router and, at each router's sparsity, the static
router on its schedule, ShortGPT, the static router with a uniform schedule and
random token choice, on held-out text (`ftp_vllm.texts`, evaluation split;
`--text PATH` for any text file, one document per paragraph), what a served
request sees:

- continuation: `--chunks` chunks of 224 + 32 tokens; the 224 are routed as a
  prompt, the 32 scored under the decode rule: perplexity, top-1 agreement and
  KL(dense || pruned) per token.  Full-sequence perplexity (all positions of
  the same pass) is printed too, labelled as misleading.
- cloze: `--items` four-way next-sentence items (`ftp_vllm.evaluation.cloze_items`),
  accuracy with a 95% Wilson interval.  Retention = pruned / dense accuracy;
  above-chance retention = (acc - 0.25) / (dense - 0.25).

Sparsity is the realised share of token-block computations skipped, counted
from the keep masks of every prompt and decode token the method ran (each
cloze context counted once, as it runs once); prompt and decode shares are
reported apart, and the prompt share once more over the prompts a router routes
(a cloze context shorter than its `min_prompt` runs dense): that is the share
its declared prompt target is about.  Baselines at a router's sparsity s (its declared prompt
target): ShortGPT drops round(s' B) blocks of lowest Block Influence, measured
on calibration text (realised n / B), where s' is the share the router
realised overall in this run (a router may keep decode tokens dense, a dropped
block skips every token: so both skip about the same share of computations),
or s when the router is not run; shortgpt-prompt drops the same kind of blocks
under FTP's serving rule -- every prompt token skips them, decode tokens run
every block -- with round(p' B) blocks, p' the router's realised prompt share
(so prompt, decode and overall shares all match the router's: the like-for-like
comparison of choosing tokens against choosing blocks); static applies the
static router (keep the most recent tokens) on the router's own per-block
prompt schedule, prompts shorter than its `min_prompt` dense: what the router
must beat, the same blocks at the same rates with tokens chosen by recency
alone; static-uniform applies the static router at
one rate on every block but the first and last two (kept dense: skipping there
ruins a small model), the rate set so the mean over all blocks is s; a decode
token is the most recent token, which the static router always keeps, so its
decode sparsity is 0 and its overall share is below s.  Random token choice
uses the router's own prompt and decode schedules (seeded).

Speed: this runs on a few CPU cores (one SmolLM2-135M forward runs about
300-400 tokens/s on two).  A configuration (a method at one sparsity) takes
about 5 minutes for 1000 items on two cores, so a full run of every method at
every shipped router takes well over an hour; `--methods` and `--routers`
subset it.  To get there, (1) each cloze context runs once and its four candidates
branch off it (`branch_logprobs`: identical to one pass per candidate), (2)
contexts are the last 64 tokens before the true sentence (the routers serve
shorter prompts dense) and candidates the first 12 tokens of each sentence
(~110 tokens per item instead of ~4 x 120),
(3) the dense model's outputs are computed once and reused for KL and top-1.
On a machine whose cores other jobs share, `--threads 1` ran 2-3x faster than
two threads (spinning thread pools lose their time slices).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from ftp_vllm.baselines import (
    calibration_block_influence, random_rule, shortgpt_blocks, shortgpt_prompt_rule, shortgpt_rule, static_rule,
    uniform_schedule,
)
from ftp_vllm.checkpoint import check_compatible, load_checkpoint, router_label, router_levels
from ftp_vllm.evaluation import (
    CHANCE, ROUTED, ContinuationSums, Method, SkipCounter, cloze_items, cloze_scores, continuation_pass,
    paired_retention_interval, retention, wilson_interval,
)
from ftp_vllm.model_store import DEFAULT_MODEL, resolve_model
from ftp_vllm.reference import RoutedModel
from ftp_vllm.texts import document_chunks, documents, file_documents

METHODS = ("dense", "ftp", "static", "shortgpt", "shortgpt-prompt", "static-uniform", "random")
SHIPPED_ROUTERS = [f"{DEFAULT_MODEL}-s{p}" for p in (20, 22, 30, 40)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="known model name or model folder")
    p.add_argument("--routers", nargs="*", default=None,
                   help=f"router names or folders (default: {' '.join(SHIPPED_ROUTERS)} for the default model)")
    p.add_argument("--sparsities", nargs="*", type=float, default=[],
                   help="extra sparsities for the baselines alone (no router)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="methods to run (dense always runs)")
    p.add_argument("--text", help="a text file to evaluate on instead of the held-out split (paragraphs = documents)")
    p.add_argument("--items", type=int, default=1000, help="cloze items")
    p.add_argument("--chunks", type=int, default=32, help="continuation chunks")
    p.add_argument("--context", type=int, default=224, help="routed prompt tokens of a continuation chunk")
    p.add_argument("--continuation", type=int, default=32, help="scored continuation tokens of a chunk")
    p.add_argument("--cloze-context", type=int, default=64,
                   help="context tokens of a cloze item (at least the routers' min_prompt, or they run dense)")
    p.add_argument("--cloze-candidate", type=int, default=12, help="tokens of each cloze candidate")
    p.add_argument("--calib-chunks", type=int, default=8, help="256-token calibration chunks for Block Influence")
    p.add_argument("--batch-items", type=int, default=32, help="cloze items per forward")
    p.add_argument("--batch-chunks", type=int, default=4, help="continuation chunks per forward")
    p.add_argument("--threads", type=int, help="torch threads (on a machine shared with other jobs, 1 is often faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="retention-vs-sparsity plot (default: next to --json, else results/accuracy.png)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


# ---- configurations ----------------------------------------------------------------

def build_methods(args, model: RoutedModel, model_folder: Path, tokenizer) -> list[Method]:
    B = model.num_blocks
    routers = args.routers if args.routers is not None else (SHIPPED_ROUTERS if args.model == DEFAULT_MODEL else [])
    methods = [Method("dense", info={"declared_sparsity": 0.0})]
    targets = []  # (sparsity, prompt schedule, decode schedule, router name)
    for name, level in router_levels(routers):
        router, config = load_checkpoint(name, level)
        check_compatible(config, model_folder)
        label = router_label(name, level)
        info = {"declared_sparsity": config.get("target_sparsity"),
                "declared_decode_sparsity": config.get("decode_target_sparsity")}
        if "ftp" in args.methods:
            methods.append(Method("ftp", label, router=router, info=info))
        if "static" in args.methods:
            methods.append(static_method(router, label, info))
        targets.append((float(router.sparsity.mean()), router.sparsity.tolist(), router.decode_sparsity.tolist(), label))
    for s in args.sparsities:
        uniform = uniform_schedule(B, s, dense_edges(B))
        targets.append((s, uniform, uniform, None))
    influence = None
    if {"shortgpt", "shortgpt-prompt"} & set(args.methods) and targets:
        influence = calibration_block_influence(model, tokenizer, args.calib_chunks, args.seed)
    for s, prompt, decode, label in targets:
        matched = {"matched_to": label, "matched_sparsity": round(s, 4)}
        for name in ("shortgpt", "shortgpt-prompt"):
            if name in args.methods:
                methods.append(shortgpt_method(name, influence.tolist(), s, matched))
        if "static-uniform" in args.methods:
            uniform = uniform_schedule(B, s, dense_edges(B))
            methods.append(Method("static-uniform", keep_rule=static_rule(uniform),
                                  info={**matched, "declared_sparsity": round(s, 4), "block_rate": round(max(uniform), 4),
                                        "dense_edges": dense_edges(B)}))
        if "random" in args.methods:
            methods.append(Method("random", keep_rule=random_rule(prompt, decode, args.seed),
                                  info={**matched, "declared_sparsity": round(s, 4)}))
    return methods


def static_method(router, label: str, info: dict) -> Method:
    """The static router on `router`'s per-block prompt schedule and `min_prompt`; decode tokens
    kept (a decode token is the most recent token)."""
    rule = static_rule(router.sparsity.tolist(), router.min_prompt)
    return Method("static", label, keep_rule=rule, min_prompt=router.min_prompt,
                  info={**info, "declared_decode_sparsity": 0.0})


def shortgpt_method(name: str, influence: list[float], sparsity: float, info: dict) -> Method:
    """Drop the round(sparsity B) blocks of lowest Block Influence: for every token ("shortgpt")
    or for prompt tokens only ("shortgpt-prompt")."""
    B = len(influence)
    dropped = shortgpt_blocks(torch.tensor(influence), round(sparsity * B))
    rule = shortgpt_rule if name == "shortgpt" else shortgpt_prompt_rule
    return Method(name, keep_rule=rule(B, dropped),
                  info={**info, "declared_sparsity": len(dropped) / B, "dropped_blocks": dropped,
                        "block_influence": [round(x, 5) for x in influence]})


def dense_edges(num_blocks: int) -> int:
    """Blocks kept dense at each end by the uniform schedule: 2 on real models, fewer on tiny ones."""
    return min(2, num_blocks // 6)


# ---- running -----------------------------------------------------------------------

def run(args) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    start = time.perf_counter()
    folder = resolve_model(args.model)
    model = RoutedModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = file_documents(args.text) if args.text else documents("evaluation")
    length = args.context + args.continuation
    chunks = document_chunks(tokenizer, docs, length, None, args.seed)[: args.chunks]
    if not len(chunks):
        raise SystemExit(f"accuracy: the text has no document of {length} tokens for the continuation metrics")
    items = cloze_items(tokenizer, docs, args.items, args.seed, args.cloze_context, args.cloze_candidate)
    methods = build_methods(args, model, folder, tokenizer)
    chunk_batches = list(torch.split(chunks, args.batch_chunks))
    item_batches = [items[i:i + args.batch_items] for i in range(0, len(items), args.batch_items)]
    answers = torch.tensor([it.answer for it in items])
    bar = tqdm(total=len(methods) * (len(chunk_batches) + len(item_batches)), disable=not args.progress)

    dense_cont: list[torch.Tensor] = []
    rows, realised = [], {}
    for method in methods:
        t0 = time.perf_counter()
        if method.method.startswith("shortgpt") and method.info["matched_to"] in realised:  # what the router skipped
            share = realised[method.info["matched_to"]]["sparsity" if method.method == "shortgpt" else "sparsity_prompt"]
            info = {**method.info, "matched_sparsity": round(share, 4)}
            method = shortgpt_method(method.method, method.info["block_influence"], share, info)
        bar.set_description(f"{method.method} {method.router_name or method.info.get('matched_sparsity', '')}")
        cont_counter, cloze_counter, sums = SkipCounter(), SkipCounter(), ContinuationSums()
        for i, batch in enumerate(chunk_batches):
            is_dense = method.method == "dense"  # first: its outputs are every other method's reference
            cont = continuation_pass(model, method, batch, args.context, None if is_dense else dense_cont[i],
                                     cont_counter, sums)
            if is_dense:
                dense_cont.append(cont)
            bar.update(1)
        scores = []
        for batch in item_batches:
            scores.append(cloze_scores(model, method, batch, cloze_counter))
            bar.update(1)
        item_correct = torch.cat(scores).argmax(-1) == answers
        row = result_row(method, sums.metrics(), int(item_correct.sum()), len(items), cont_counter + cloze_counter,
                         time.perf_counter() - t0)
        row["cloze_correct"] = "".join("01"[int(c)] for c in item_correct)
        row["sparsity_continuation"], row["sparsity_cloze"] = cont_counter.share(), cloze_counter.share()
        # prompts of the calibration length (continuation) and short cloze contexts apart: the always-kept
        # first and last tokens weigh more in a short prompt, so it skips less than its target
        row["sparsity_prompt_continuation"] = cont_counter.share("prompt")
        row["sparsity_prompt_cloze"] = cloze_counter.share("prompt")
        rows.append(row)
        if method.router is not None:
            realised[method.router_name] = row
    bar.close()
    add_ratios(rows)
    return {
        "results": rows,
        "setup": {
            "command": "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
            "model": args.model, "num_blocks": model.num_blocks,
            "text": args.text or "held-out evaluation split (pydoc_data.topics, ftp_vllm.texts)",
            "continuation": f"{len(chunks)} chunks: {args.context}-token routed prompt, {args.continuation} tokens "
                            "scored under the decode rule",
            "cloze": f"{len(items)} items: {CHANCE:.0%} chance; context = last {args.cloze_context} tokens before "
                     f"the true sentence, candidates = first {args.cloze_candidate} tokens of each sentence, "
                     "summed log-likelihood",
            "sparsity": "realised share of token-block computations skipped (keep masks of every prompt and "
                        "decode token run; each cloze context once)",
            "full_seq_ppl": "perplexity over every position of the routed pass: misleading, since a skipped prompt "
                            "token's own prediction is never served",
            "wall_time_s": round(time.perf_counter() - start, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        },
    }


def result_row(method: Method, cont: dict, correct: int, n: int, counter: SkipCounter, wall: float) -> dict:
    lo, hi = wilson_interval(correct, n)
    row = {
        "method": method.method, "router": method.router_name, **method.info,
        "sparsity": counter.share(), "sparsity_prompt": counter.share("prompt"),
        "sparsity_decode": counter.share("decode"), "sparsity_prompt_routed": counter.share(ROUTED),
        **cont, "cloze_acc": correct / n, "cloze_ci95": [lo, hi], "cloze_items": n, "wall_s": round(wall, 1),
    }
    if method.router is not None:
        # The checkpoint declares its prompt target for the prompts it routes (min_prompt tokens or
        # more; shorter ones run dense): the overall target weighs this run's tokens accordingly.
        total = counter.total
        declared = ((total[ROUTED] * row["declared_sparsity"] + total["decode"] * row["declared_decode_sparsity"])
                    / (total["prompt"] + total["decode"]))
        row["sparsity_target"] = declared
        row["sparsity_within_1pt"] = abs(row["sparsity"] - declared) <= 0.01
        if counter.tokens[ROUTED]:
            row["sparsity_prompt_within_1pt"] = abs(row["sparsity_prompt_routed"] - row["declared_sparsity"]) <= 0.01
        if counter.tokens["decode"]:
            row["sparsity_decode_within_1pt"] = abs(row["sparsity_decode"] - row["declared_decode_sparsity"]) <= 0.01
    return row


def add_ratios(rows: list[dict]) -> None:
    """Ratios to the dense row; cloze retention with a paired 95% interval (the same items)."""
    dense = next(r for r in rows if r["method"] == "dense")
    bits = lambda r: torch.tensor([c == "1" for c in r["cloze_correct"]])  # noqa: E731
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / dense["ppl"]
        r["ppl_retention"] = dense["ppl"] / r["ppl"]
        r["cloze_retention"] = retention(r["cloze_acc"], dense["cloze_acc"])
        r["cloze_above_chance_retention"] = retention(r["cloze_acc"], dense["cloze_acc"], CHANCE)
        r["cloze_retention_ci95_paired"] = paired_retention_interval(bits(r), bits(dense))
        r["cloze_above_chance_retention_ci95_paired"] = paired_retention_interval(bits(r), bits(dense), CHANCE)


# ---- output ------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    head = ("method", "router / matched", "sparsity p (routed)/d/all", "ppl", "ratio", "top1", "KL", "full-seq ppl*",
            "cloze acc [95% CI]", "retention [paired 95% CI]", "above-chance")
    lines = [head]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for r in rows:
        lo, hi = r["cloze_ci95"]
        lines.append((
            r["method"], r["router"] or (r.get("matched_to") or f"s={r.get('matched_sparsity', 0)}"),
            f"{pct(r['sparsity_prompt'])} ({pct(r['sparsity_prompt_routed'])})/{pct(r['sparsity_decode'])}/"
            f"{pct(r['sparsity'])}",
            f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.3f}", f"{r['top1_agreement']:.3f}", f"{r['kl']:.3f}",
            f"{r['full_seq_ppl']:.1f}", f"{100 * r['cloze_acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
            "{:.3f} [{:.3f}, {:.3f}]".format(r["cloze_retention"], *r["cloze_retention_ci95_paired"]),
            f"{r['cloze_above_chance_retention']:.3f}",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("sparsity: realised % of token-block computations skipped (prompt (of routed prompts) / decode / "
               "all); ppl, ratio, top1, KL: continuation under the decode rule; *full-seq ppl misleads (skipped "
               "prompt tokens' own predictions are never served); retention = cloze acc / dense, above-chance = "
               "(acc - .25) / (dense - .25)")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "cloze_retention", "cloze accuracy retention (pruned / dense)"),
                           (axes[1], "ppl_retention", "continuation ppl retention (dense / pruned)")):
        dense = [(100 * r["sparsity"], r[key]) for r in rows if r["method"] == "dense"]
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            pts = dense + sorted((100 * r["sparsity"], r[key]) for r in rows if r["method"] == method and math.isfinite(r[key]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("realised sparsity (% of token-block computations skipped)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.argv = argv
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(format_table(report["results"]))
    print(f"wall time: {report['setup']['wall_time_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    png = Path(args.png) if args.png else (Path(args.json).with_suffix(".png") if args.json else Path("results/accuracy.png"))
    plot(report["results"], png)
    print(f"plot: {png}")
    return report


if __name__ == "__main__":
    main()
