"""The sparsity dial's levels side by side: quality and speed of each level of a ladder.

    python benchmarks/dial_plot.py --accuracy results/accuracy-dial.json \
        --throughput results/throughput-dial.json --png results/dial.png

Reads what `accuracy.py` and `throughput.py` wrote for a ladder checkpoint
(`--routers smollm2-135m-instruct-dial`: one row per level, `NAME@LEVEL`) and
prints one table (level, realised prompt sparsity, perplexity ratio, cloze
retention, prompt throughput ratio to stock) and draws one figure of the
same.  Level 0 is the dense model: the dense rows of both runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def level_of(router: str | None) -> float | None:
    """The level in a ladder row's router label (`NAME@0.2`), None for other rows."""
    return float(router.rpartition("@")[2]) if router and "@" in router else None


def dial_rows(accuracy: dict, throughput: dict, workload: str = "prompt-heavy") -> list[dict]:
    """One row per level, from the two benchmarks' JSON, rising by level; level 0 from their dense rows."""
    speed = {level_of(r["router"]) if r["method"] != "dense" else 0.0: r for r in throughput["results"]
             if r["workload"] == workload and (r["method"] == "dense" or level_of(r["router"]) is not None)}
    rows = []
    for r in accuracy["results"]:
        level = 0.0 if r["method"] == "dense" else level_of(r["router"])
        if level is None or (r["method"] != "dense" and r["method"] != "ftp"):
            continue
        rows.append({"level": level, "prompt_sparsity": r.get("sparsity_prompt_routed") or 0.0,
                     "ppl_ratio": r["ppl_ratio"], "cloze_retention": r["cloze_retention"],
                     "cloze_retention_ci95": r["cloze_retention_ci95_paired"],
                     "throughput_ratio": speed[level]["ratio_to_dense"] if level in speed else None})
    return sorted(rows, key=lambda row: row["level"])


def format_table(rows: list[dict]) -> str:
    lines = ["| level | prompt sparsity (realised) | ppl ratio | cloze retention [paired 95% CI] | prompt throughput / stock |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lo, hi = r["cloze_retention_ci95"]
        speed = "-" if r["throughput_ratio"] is None else f"{r['throughput_ratio']:.2f}"
        lines.append(f"| {r['level']:g} | {100 * r['prompt_sparsity']:.1f}% | {r['ppl_ratio']:.3f} | "
                     f"{r['cloze_retention']:.3f} [{lo:.3f}, {hi:.3f}] | {speed} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [100 * r["level"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, label in ((axes[0], "ppl_ratio", "continuation ppl / dense"),
                           (axes[1], "cloze_retention", "cloze accuracy retention"),
                           (axes[2], "throughput_ratio", "prompt throughput / stock vLLM")):
        pts = [(x, r[key]) for x, r in zip(levels, rows) if r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("level requested (% prompt sparsity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("One server, one router: each request's level")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accuracy", required=True, help="accuracy.py JSON of a ladder's levels")
    p.add_argument("--throughput", required=True, help="throughput.py JSON of the same levels")
    p.add_argument("--png", default="results/dial.png")
    args = p.parse_args(argv)
    rows = dial_rows(json.loads(Path(args.accuracy).read_text()), json.loads(Path(args.throughput).read_text()))
    print(format_table(rows))
    plot(rows, Path(args.png))
    return rows


if __name__ == "__main__":
    main()
