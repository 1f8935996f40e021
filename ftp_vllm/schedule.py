"""Genetic-algorithm search for the per-block sparsity schedule.

A schedule gives each block b a sparsity s_b in [0, upper]; its mean is the
overall target (the share of token-block computations skipped).  Schedules are
held as integer counts of `step` (s_b = n_b * step, sum n_b fixed), so every
candidate's mean is the target exactly, and a block is always free to get 0:
on small models skipping in the first block is ruinous and the search has to
be able to say so.

Fitness (lower is better) is what a served request sees (`continuation_kl`):
each calibration chunk's first `context` tokens are routed as a prompt, the
rest are scored as a continuation under the decode rule, and the score is the
mean KL(dense || pruned) of the continuation's next-token distributions.
Full-sequence perplexity would mostly measure skipped prompt tokens' own
predictions, which serving never uses.  The same chunks cut into short prompts
(`evaluation.ContinuationBatch.short_windows`) can add their KL to it, so the
search also sees the shortest routed prompts (64 tokens), the length a cloze
context has.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .baselines import static_keep
from .evaluation import ContinuationBatch, continuation_logprobs, kl_and_nll
from .reference import Calibrating, GivenMasks, RoutedModel
from .router import Router

Fitness = Callable[[list[float]], float]


@dataclass
class SearchResult:
    schedule: list[float]
    fitness: float
    uniform_fitness: float
    evaluations: int
    best_per_generation: list[float] = field(default_factory=list)


# ---- fitness -------------------------------------------------------------------

def static_fitness(model: RoutedModel, batch: ContinuationBatch) -> Fitness:
    """Continuation KL with the static router at a candidate prompt schedule (its decode
    tokens are the most recent token, which it always keeps)."""
    dense = continuation_logprobs(model, batch)

    def fitness(schedule: list[float]) -> float:
        keep = static_keep(batch.cu_seqlens, schedule, batch.prompt_lens)
        return kl_and_nll(continuation_logprobs(model, batch, GivenMasks(keep)), dense, batch.targets)[0]

    return fitness


def router_fitness(
    model: RoutedModel, router: Router, batch: ContinuationBatch, decode_schedule: Callable[[list[float]], list[float]]
) -> Fitness:
    """Continuation KL with the trained router at a candidate schedule, its thresholds
    calibrated on the same pass so every candidate realises exactly its sparsities."""
    dense = continuation_logprobs(model, batch)

    def fitness(schedule: list[float]) -> float:
        router.set_schedule(schedule, decode_schedule(schedule))
        return kl_and_nll(continuation_logprobs(model, batch, Calibrating(router)), dense, batch.targets)[0]

    return fitness


def summed(fitnesses: Sequence[Fitness]) -> Fitness:
    """One fitness from several batches (full-length and short prompts): the sum of their KLs."""
    return lambda schedule: sum(f(schedule) for f in fitnesses)


def scaled_schedule(schedule: Sequence[float], mean: float) -> list[float]:
    """`schedule` scaled to another mean (decode sparsity below the prompt's: never above 1)."""
    current = sum(schedule) / len(schedule)
    return [0.0] * len(schedule) if current == 0 else [min(1.0, s * mean / current) for s in schedule]


# ---- the search -----------------------------------------------------------------

class _Space:
    """Integer schedules n_b in [0, upper_n], sum = total."""

    def __init__(self, num_blocks: int, target: float, upper: float, step: float, rng: random.Random):
        units = target * num_blocks / step
        if abs(units - round(units)) > 1e-6:
            raise ValueError(f"target {target} x {num_blocks} blocks is not a whole number of steps of {step}")
        self.total, self.upper, self.step, self.n, self.rng = round(units), round(upper / step), step, num_blocks, rng
        if not 0 <= self.total <= self.upper * num_blocks:
            raise ValueError(f"target {target} is out of reach with per-block sparsity at most {upper}")

    def repair(self, genes: list[int]) -> tuple[int, ...]:
        genes = [min(self.upper, max(0, g)) for g in genes]
        while (excess := sum(genes) - self.total) != 0:
            movable = [b for b, g in enumerate(genes) if (g > 0 if excess > 0 else g < self.upper)]
            b = self.rng.choice(movable)
            genes[b] += -1 if excess > 0 else 1
        return tuple(genes)

    def spread(self, free: Sequence[int]) -> tuple[int, ...]:
        """The total spread evenly over the `free` blocks (others 0)."""
        genes = [0] * self.n
        for i, b in enumerate(free):
            genes[b] = self.total // len(free) + (i < self.total % len(free))
        return self.repair(genes)

    def mutate(self, genes: tuple[int, ...], moves: int) -> tuple[int, ...]:
        genes = list(genes)
        for _ in range(moves):
            donors = [b for b, g in enumerate(genes) if g > 0]
            takers = [b for b, g in enumerate(genes) if g < self.upper]
            if not donors or not takers:
                break
            d, t = self.rng.choice(donors), self.rng.choice(takers)
            amount = self.rng.randint(1, max(1, min(genes[d], self.upper - genes[t], self.total // self.n or 1)))
            genes[d] -= amount
            genes[t] += amount
        return tuple(genes)

    def crossover(self, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        return self.repair([x if self.rng.random() < 0.5 else y for x, y in zip(a, b)])

    def schedule(self, genes: tuple[int, ...]) -> list[float]:
        return [round(g * self.step, 10) for g in genes]


def genetic_search(
    fitness: Fitness,
    num_blocks: int,
    target: float,
    *,
    upper: float = 0.8,
    step: float = 0.01,
    population: int = 8,
    generations: int = 5,
    seed: int = 0,
    initial: Sequence[Sequence[float]] = (),
    progress: bool = True,
    desc: str = "schedule search",
) -> SearchResult:
    """Minimise `fitness` over schedules with mean `target`.  The first generation holds the
    uniform schedule, schedules keeping the first and last 1 or 2 blocks dense, the `initial`
    ones, and mutations of them; each later one keeps the two best (elitism) and breeds the
    rest by tournament selection, uniform crossover (repaired to the fixed total) and moves of
    sparsity between blocks.  Candidates are memoised, so the best never gets worse and the
    result is never worse than the uniform schedule or any `initial` one.  Deterministic per seed."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    space = _Space(num_blocks, target, upper, step, rng)
    seen: dict[tuple[int, ...], float] = {}
    bar = tqdm(total=population * generations, desc=desc, disable=not progress, leave=False)

    def score(genes):
        if genes not in seen:
            seen[genes] = fitness(space.schedule(genes))
        bar.update(1)
        bar.set_postfix(best=f"{min(seen.values()):.4f}")
        return seen[genes]

    uniform = space.spread(range(num_blocks))
    seeds = [uniform]
    for edge in (1, 2):
        if num_blocks > 2 * edge:
            seeds.append(space.spread(range(edge, num_blocks - edge)))
    seeds += [space.repair([round(s / step) for s in sched]) for sched in initial]
    pool = list(dict.fromkeys(seeds))[:population]
    while len(pool) < population:
        pool.append(space.mutate(rng.choice(seeds), moves=rng.randint(1, 4)))

    history = []
    for gen in range(generations):
        ranked = sorted(pool, key=lambda g: (score(g), g))
        history.append(seen[ranked[0]])
        if gen == generations - 1:
            break
        children = ranked[:2]
        while len(children) < population:
            a = min(rng.sample(ranked, 2), key=lambda g: (seen[g], g))
            b = min(rng.sample(ranked, 2), key=lambda g: (seen[g], g))
            children.append(space.mutate(space.crossover(a, b), moves=rng.randint(0, 3)))
        pool = children
    bar.close()
    best = min(seen, key=lambda g: (seen[g], g))
    if uniform not in seen:
        seen[uniform] = fitness(space.schedule(uniform))
    return SearchResult(space.schedule(best), seen[best], seen[uniform], len(seen), history)
