"""`ftp-vllm train`: from a base model to a router checkpoint.

1. schedule search with the static router (the router does not exist yet);
2. router inputs calibrated on a dense pass (mean queries, feature statistics),
   and the MLP warm-started on the guide loss alone (`fit_guide`: the static
   router's decisions);
3. router training with the three losses, each chunk served as in evaluation (a
   routed prompt, then a continuation under the decode schedule), distilling
   the outputs a served request uses: the continuation's next-token predictions;
   the training gate uses thresholds calibrated on each step (`gate`), as
   serving will, and a temperature annealed from `temperature_start` to
   `temperature`.  Each loss is measured before and after on one fixed batch
   of the threshold calibration chunks, which training steps never see.  The
   trained MLP is kept only if its continuation KL on the search text beats
   the warm start's (model selection on calibration text; both figures go
   into the checkpoint);
4. thresholds calibrated so each block's realised prompt and decode sparsity
   equal the schedule on calibration text;
5. the schedule searched again with the trained router (fine-tuning the first
   one, which seeds it), thresholds recalibrated;
6. realised sparsities and continuation quality measured on held-out
   evaluation text, then the checkpoint is written.

Decode tokens may get a lower overall sparsity than prompts (`decode_sparsity`;
routing a continuation costs more quality); the checkpoint then declares both
targets, each as realised on calibration text.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from .baselines import static_keep
from .evaluation import ContinuationBatch, SkipCounter, continuation_logprobs, kl_and_nll
from .model_store import resolve_model
from .reference import (
    GivenMasks, RoutedModel, Served, calibrate_router_inputs, calibrate_router_thresholds, calibrate_short_thresholds,
    is_prompt, prompt_windows, short_prompt_lengths,
)
from .schedule import Fitness, SearchResult, genetic_search, router_fitness, scaled_schedule, static_fitness, summed
from .texts import python_version, token_chunks


@dataclass
class TrainSettings:
    model: str
    sparsity: float
    out: str
    decode_sparsity: float | None = None  # None: decode follows the prompt schedule
    steps: int = 24
    seed: int = 0
    lr: float = 1e-3
    gate: str = "calibrated"  # training gate: "calibrated" thresholds or "fixed" p > 0.5
    guide_fit_steps: int = 300
    train_batch: int = 2  # chunks per training step
    min_prompt: int = 64  # shorter prompts are served dense
    temperature_start: float = 8.0  # training gate temperature, annealed geometrically from this ...
    temperature: float = 1.0  # ... to this over the steps
    guide_decay: float = 0.5
    chunk_len: int = 256
    context: int = 224  # prompt part of an evaluation chunk; the rest is the scored continuation
    short_context: int = 64  # the search also scores prompts this short (0: full-length prompts only)
    search_chunks: int = 6
    calib_chunks: int = 16
    train_chunks: int = 48
    eval_chunks: int = 8
    population: int = 12
    generations: int = 10  # the schedule does most of the work: a short search costs quality (README)
    router_generations: int = 3
    upper: float = 0.8
    step: float = 0.01
    device: str = "cpu"  # where the frozen model and the router run (e.g. "cuda" for a 7B model)
    progress: bool = True


def calibration_split(tokenizer, s: TrainSettings) -> tuple[ContinuationBatch, ContinuationBatch, list]:
    """The calibration text's three disjoint parts: schedule search, threshold calibration
    (both as context + continuation), and router training chunks."""
    cal = token_chunks(tokenizer, "calibration", s.chunk_len, s.search_chunks + s.calib_chunks + s.train_chunks, s.seed)
    search = ContinuationBatch.of(cal[: s.search_chunks], s.context)
    calib = ContinuationBatch.of(cal[s.search_chunks: s.search_chunks + s.calib_chunks], s.context)
    return search, calib, cal[s.search_chunks + s.calib_chunks:]


def search_batches(search_text: ContinuationBatch, s: TrainSettings) -> list[ContinuationBatch]:
    """What the schedule search scores: the search chunks as full-length prompts, and cut into
    `short_context`-token prompts."""
    return [search_text, *([search_text.short_windows(s.short_context)] if s.short_context else [])]


def evaluation_split(tokenizer, s: TrainSettings) -> ContinuationBatch:
    """The held-out chunks training reports its quality and realised sparsity on."""
    return ContinuationBatch.of(token_chunks(tokenizer, "evaluation", s.chunk_len, s.eval_chunks, s.seed), s.context)


def search_description(s: TrainSettings) -> str:
    text = (f"mean KL(dense || pruned) over the {s.chunk_len - s.context} continuation tokens of "
            f"{s.search_chunks} calibration chunks after a {s.context}-token routed prompt")
    if s.short_context:
        text += f", plus the same over those chunks cut into windows with a {s.short_context}-token routed prompt"
    return text


def searched_fitness(model: RoutedModel, router, searched: list[ContinuationBatch], decode_of) -> Fitness:
    """KL to the dense model, summed over the search batches, of `router` under a candidate
    prompt schedule (decode schedule `decode_of(schedule)`): the second search's fitness."""
    return summed([router_fitness(model, router, b, decode_of) for b in searched])


def router_search(fitness: Fitness, s: TrainSettings, sparsity: float, generations: int,
                  initial: list[float], desc: str, progress: bool) -> SearchResult:
    """The schedule search with a trained router, seeded with the schedule it was trained or
    scaled under; shared by training and `rescale_router` so both search the same space."""
    return genetic_search(fitness, len(initial), sparsity, upper=s.upper, step=s.step, population=s.population,
                          generations=generations, seed=s.seed + 1, initial=[initial], progress=progress, desc=desc)


@contextmanager
def timed(log: dict, name: str):
    """Record the wall time of the `with` block in `log[name]`, in seconds."""
    start = time.perf_counter()
    yield
    log[name] = round(time.perf_counter() - start, 1)


def run_training(settings: TrainSettings, command: str = "") -> tuple[Path, dict]:
    """Run the whole pipeline; returns the checkpoint folder and its config."""
    s = settings
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    torch.manual_seed(s.seed)
    with timed(stages, "load"):
        folder, model, tokenizer = load_model(s)
        search_text, calib_text, train_text = calibration_split(tokenizer, s)
        eval_text = evaluation_split(tokenizer, s)
    decode_of = decode_schedule_of(s)
    searched = search_batches(search_text, s)
    with timed(stages, "static_search"):
        static = static_search(model, searched, s)
    with timed(stages, "input_calibration_and_warm_start"):
        router, guide_fit = warm_started_router(model, static.schedule, decode_of, calib_text, s)
    with timed(stages, "training"):
        fitness = searched_fitness(model, router, searched, decode_of)
        trained = train_and_select(model, router, train_text, calib_text, fitness, s)
        trained["selection"]["guide_fit_loss"] = round(guide_fit, 5)
    with timed(stages, "router_search"):
        tuned = router_search(fitness, s, s.sparsity, s.router_generations, static.schedule,
                              "schedule search (trained router)", s.progress)
        router.set_schedule(tuned.schedule, decode_of(tuned.schedule))
    with timed(stages, "thresholds_and_evaluation"):
        reached = calibrate_and_measure(model, router, calib_text, eval_text)
    training = {"command": command, **trained,
                "wall_time_s": round(time.perf_counter() - t0, 1), "stage_wall_time_s": stages}
    config = training_config(s, folder, static, tuned, reached, training, len(train_text))
    out = save_checkpoint(s.out, router, config)
    return out, load_checkpoint(out)[1]


def load_model(s: TrainSettings):
    """(model folder, reference model, tokenizer); with a device other than the CPU, text, router
    and scratch tensors are made there too."""
    from transformers import AutoTokenizer

    folder = resolve_model(s.model)
    if s.device != "cpu":
        torch.set_default_device(s.device)
    model = RoutedModel.from_pretrained(folder).to(s.device)
    return folder, model, AutoTokenizer.from_pretrained(folder)


def decode_schedule_of(s: TrainSettings):
    """The decode schedule a prompt schedule implies: the same, or scaled to `decode_sparsity`."""
    if s.decode_sparsity is None:
        return lambda sched: list(sched)
    return lambda sched: scaled_schedule(sched, s.decode_sparsity)


def static_search(model: RoutedModel, searched: list[ContinuationBatch], s: TrainSettings) -> SearchResult:
    """The first schedule search, with the static router (the router does not exist yet)."""
    fitness = summed([static_fitness(model, b) for b in searched])
    return genetic_search(fitness, model.num_blocks, s.sparsity, upper=s.upper, step=s.step, population=s.population,
                          generations=s.generations, seed=s.seed, progress=s.progress,
                          desc="schedule search (static router)")


def warm_started_router(model: RoutedModel, schedule: list[float], decode_of, calib_text: ContinuationBatch,
                        s: TrainSettings):
    """A router at `schedule` with its inputs calibrated on a dense pass and its MLP fitted to the
    static router's decisions; returns it and the final guide loss."""
    from .train import fit_guide

    router = model.new_router(min_prompt=s.min_prompt, short_lengths=short_prompt_lengths(s.min_prompt, s.context),
                              threshold_length=s.context)
    router.set_schedule(schedule, decode_of(schedule))
    calibrate_router_inputs(model, router, calib_text.input_ids, calib_text.cu_seqlens)
    guide_fit = fit_guide(model, router, calib_text.input_ids, calib_text.cu_seqlens, calib_text.prompt_lens,
                          steps=s.guide_fit_steps, seed=s.seed)
    return router, guide_fit


def train_on_chunks(model: RoutedModel, router, train_text, calib_text: ContinuationBatch, s: TrainSettings):
    """Router training on the training chunks, `train_batch` chunks a step, each served as in
    evaluation, with the losses on the first `train_batch` threshold calibration chunks before
    and after; returns the `train.TrainingRun`."""
    from .train import train_router

    as_batch = lambda b: (b.input_ids, b.cu_seqlens, b.scored, b.prompt_lens)  # noqa: E731
    batches = [as_batch(ContinuationBatch.of(train_text[i:i + s.train_batch], s.context))
               for i in range(0, len(train_text), s.train_batch)]
    calib_chunks = calib_text.input_ids.view(len(calib_text.prompt_lens), -1)
    held_back = as_batch(ContinuationBatch.of(calib_chunks[:s.train_batch], s.context))
    return train_router(model, router, batches, s.steps, lr=s.lr, temperature=(s.temperature_start, s.temperature),
                        guide_decay=s.guide_decay, progress=s.progress, calibrated=s.gate == "calibrated",
                        held_back=held_back)


def train_and_select(model: RoutedModel, router, train_text, calib_text: ContinuationBatch, fitness: Fitness,
                     s: TrainSettings) -> dict:
    """Router training from the router's current MLP at its current schedule, then model
    selection on calibration text (`keep_better_mlp`); what a checkpoint records of it: the
    loss summary, the losses on the held-back batch and the selection."""
    warm = {k: v.clone() for k, v in router.mlp.state_dict().items()}
    schedule = router.sparsity.tolist()
    run = train_on_chunks(model, router, train_text, calib_text, s)
    return {"loss": loss_summary(run.history),
            "held_back_loss": {"batch": f"the first {s.train_batch} threshold calibration chunks", **run.held_back},
            "selection": keep_better_mlp(router, warm, fitness, schedule)}


def keep_better_mlp(router, warm: dict, fitness: Fitness, schedule: list[float]) -> dict:
    """Model selection on calibration text: the trained MLP stays only if its search-text
    continuation KL at `schedule` beats the warm start's (`warm`, its state); both figures."""
    trained_kl = fitness(schedule)
    trained = {k: v.clone() for k, v in router.mlp.state_dict().items()}
    router.mlp.load_state_dict(warm)
    warm_kl = fitness(schedule)
    chosen = "trained" if trained_kl < warm_kl else "warm start"
    router.mlp.load_state_dict(trained if chosen == "trained" else warm)
    return {"search_text_continuation_kl": {"warm start": round(warm_kl, 5), "trained": round(trained_kl, 5)},
            "kept": chosen}


def training_config(s: TrainSettings, folder, static: SearchResult, tuned: SearchResult, reached: dict,
                    training: dict, train_chunks: int) -> dict:
    """The checkpoint's config: the base model, what the router targets and reaches (`reached`),
    both schedule searches, and how it was trained (`training`: command, loss, selection, wall
    times)."""
    return {
        "base_model": {"name": s.model if "/" not in s.model else Path(folder).name, **fingerprint(folder)},
        **reached,
        "search": {
            "fitness": search_description(s),
            "static_router": asdict(static),
            "trained_router": asdict(tuned),
        },
        "training": {
            "command": training["command"],
            "settings": {k: v for k, v in asdict(s).items() if k != "progress"},
            "data": {"calibration": "docstrings of standard-library modules (ftp_vllm.texts)",
                     "evaluation": "pydoc_data.topics, CPython's language reference (held out)",
                     "python": python_version(),
                     "chunks": {"search": s.search_chunks, "threshold_calibration": s.calib_chunks,
                                "training": train_chunks, "evaluation": s.eval_chunks,
                                "tokens_per_chunk": s.chunk_len}},
            "loss": training["loss"],
            "held_back_loss": training["held_back_loss"],
            "selection": training["selection"],
            "wall_time_s": training["wall_time_s"],
            "stage_wall_time_s": training["stage_wall_time_s"],
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        },
    }


def calibrate_and_measure(model: RoutedModel, router, calib_text: ContinuationBatch,
                          eval_text: ContinuationBatch) -> dict:
    """Thresholds calibrated so each block realises the router's schedule on calibration text
    (full-length and short prompts), then realised sparsity and quality on held-out text: the
    part of a checkpoint's config that says what it targets and what it reaches."""
    none = calib_text.input_ids.new_zeros(0)
    calib_out = calibrate_router_thresholds(model, router, calib_text.input_ids, calib_text.cu_seqlens,
                                            calib_text.prompt_lens, logits_at=none)
    short_windows = calibrate_short_thresholds(model, router, calib_text.prompts())
    quality, eval_keep = evaluate(model, router, eval_text)
    B = router.num_blocks
    return {
        "target_sparsity": round(sum(router.sparsity.tolist()) / B, 6),
        "decode_target_sparsity": round(sum(router.decode_sparsity.tolist()) / B, 6),
        "target_note": "mean over blocks of the share of token-block computations skipped; prompt "
                       "tokens and decode tokens each have a per-block schedule",
        "feature_normalisation": {"features": ["position", "attention score", "rank", "sparsity"],
                                  "mean": router.feature_mean.tolist(), "std": router.feature_std.tolist()},
        "realised_sparsity": {
            "calibration_text (thresholds fitted here)":
                SkipCounter.of(calib_out.keep, is_prompt(calib_text.cu_seqlens, calib_text.prompt_lens)).report(),
            "evaluation_text (held out)":
                SkipCounter.of(eval_keep, is_prompt(eval_text.cu_seqlens, eval_text.prompt_lens)).report(),
            "short_prompts": short_prompt_report(model, router, eval_text, short_windows),
        },
        "quality": quality,
    }


def evaluate(model: RoutedModel, router, batch: ContinuationBatch) -> tuple[dict, torch.Tensor]:
    """Continuation KL and perplexity ratio to dense of the router (prompt and decode routed, then
    decode kept dense) and of the static router at the same prompt schedule; the router's keep."""
    dense = continuation_logprobs(model, batch)
    dense_nll = kl_and_nll(dense, dense, batch.targets)[1]
    with torch.no_grad():
        out = model(batch.input_ids, batch.cu_seqlens, batch.prompt_lens, keep=Served(router), logits_at=batch.scored)
    results = {"routed": torch.log_softmax(out.logits.float(), -1)}
    prompt_schedule, decode_schedule = router.sparsity.tolist(), router.decode_sparsity.tolist()
    router.set_schedule(prompt_schedule, [0.0] * len(prompt_schedule))
    results["routed, decode dense"] = continuation_logprobs(model, batch, Served(router))
    router.set_schedule(prompt_schedule, decode_schedule)
    keep = static_keep(batch.cu_seqlens, prompt_schedule, batch.prompt_lens, router.min_prompt)
    results["static router, decode dense"] = continuation_logprobs(model, batch, GivenMasks(keep))
    quality = {
        "text": f"held-out evaluation text, {len(batch.prompt_lens)} chunks: {int(batch.prompt_lens[0])}-token "
                f"routed prompt, then {len(batch.targets) // len(batch.prompt_lens)} continuation tokens scored",
        "dense_continuation_ppl": round(float(torch.tensor(dense_nll).exp()), 3),
    }
    for name, logprobs in results.items():
        kl, nll = kl_and_nll(logprobs, dense, batch.targets)
        quality[name] = {"continuation_kl": round(kl, 4), "ppl_ratio_to_dense": round(float(torch.tensor(nll - dense_nll).exp()), 4)}
    return quality, out.keep


@torch.no_grad()
def short_prompt_report(model: RoutedModel, router, eval_text: ContinuationBatch, windows: dict[int, int]) -> dict:
    """Per short prompt length: the calibration windows its thresholds were fitted on, and the
    prompt sparsity realised on held-out prompts of that length (windows of the evaluation text)."""
    report = {}
    prompts = eval_text.prompts()
    for L in router.short_lengths:
        ids, cu, prompt_lens = prompt_windows(prompts, L)
        keep = model(ids, cu, prompt_lens, keep=Served(router), logits_at=ids.new_zeros(0)).keep
        report[str(L)] = {"calibration_windows": windows[L], "held_out_windows": len(prompt_lens),
                          "held_out_prompt_sparsity": round(SkipCounter.of(keep, torch.ones(keep.shape[1], dtype=torch.bool)).share("prompt"), 4)}
    return report


def _training_text(folder, config: dict, what: str):
    """(settings, model, search text, calibration text, training chunks, held-out text) of the
    training that made a checkpoint, rebuilt from the settings it recorded: what it is searched,
    trained and calibrated again on."""
    from transformers import AutoTokenizer

    from .checkpoint import check_compatible

    try:
        settings = TrainSettings(**{k: v for k, v in config["training"]["settings"].items()
                                    if k in TrainSettings.__dataclass_fields__})
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{folder}: no usable training settings in its config ({e!r}); {what} are "
                              "calibrated on the text its training used") from None
    model_folder = resolve_model(settings.model)
    check_compatible(config, model_folder)
    model = RoutedModel.from_pretrained(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    search_text, calib_text, train_text = calibration_split(tokenizer, settings)
    return settings, model, search_text, calib_text, train_text, evaluation_split(tokenizer, settings)


def rescale_router(folder: str | Path, sparsity: float | None, out: str | Path, command: str = "",
                   search_generations: int = 0, train_steps: int = 0, lr: float | None = None,
                   progress: bool = True) -> tuple[Path, dict]:
    """A router at another overall sparsity (None: its own) from a trained one: its feature
    statistics kept, its per-block schedule scaled to the new mean (decode in proportion) and,
    with `search_generations`, searched further from there with the router as training's second
    search does; with `train_steps`, its MLP trained further at that schedule as training trains
    it (`train_and_select`: kept only if it does better on calibration text); its thresholds
    calibrated again on the calibration text its training used, and held-out quality and
    realised sparsity measured as training measures them.  A schedule searched at one target
    can serve a nearby one better than a fresh search on the few calibration chunks the search
    scores (README: the 22% router)."""
    t0 = time.perf_counter()
    source, config = load_checkpoint(folder)
    sparsity = config["target_sparsity"] if sparsity is None else sparsity
    if not 0 < sparsity < 1:
        raise CheckpointError(f"target sparsity {sparsity} is not in (0, 1)")
    settings, model, search_text, calib_text, train_text, eval_text = _training_text(folder, config,
                                                                                     "rescaled thresholds")
    prompt, decode = source.sparsity.tolist(), source.decode_sparsity.tolist()
    ratio = sparsity / (sum(prompt) / len(prompt))
    over = [b for b, s in enumerate(map(max, prompt, decode)) if s * ratio > 1]
    if over:  # `scaled_schedule` would cap them at 1 and miss the target
        raise CheckpointError(f"{folder}: its schedule cannot be scaled to {sparsity}: block "
                              f"{over[0]} would skip more than every token")
    router = model.new_router(min_prompt=source.min_prompt, short_lengths=source.short_lengths,
                              threshold_length=source.threshold_length)
    router.load_state_dict(source.state_dict())
    decode_mean = ratio * sum(decode) / len(decode)
    router.set_schedule(scaled_schedule(prompt, sparsity), scaled_schedule(decode, decode_mean))
    rescaled = {"from": str(folder), "from_target_sparsity": config.get("target_sparsity"), "command": command}
    decode_of = lambda sched: scaled_schedule(sched, decode_mean)  # noqa: E731
    fitness = searched_fitness(model, router, search_batches(search_text, settings), decode_of)
    if search_generations:
        scaled_kl = fitness(router.sparsity.tolist())
        found = router_search(fitness, settings, sparsity, search_generations, router.sparsity.tolist(),
                              "schedule search (rescaled router)", progress)
        router.set_schedule(found.schedule, decode_of(found.schedule))
        rescaled["search"] = {"fitness": search_description(settings), "schedule": found.schedule,
                              "fitness_value": found.fitness, "scaled_fitness": scaled_kl,
                              "evaluations": found.evaluations, "best_per_generation": found.best_per_generation}
    training = dict(config["training"])
    if train_steps:
        settings.steps, settings.lr, settings.progress = train_steps, lr or settings.lr, progress
        training.update(train_and_select(model, router, train_text, calib_text, fitness, settings))
        rescaled["trained"] = {"steps": settings.steps, "lr": settings.lr,
                               "temperature": [settings.temperature_start, settings.temperature],
                               "train_batch": settings.train_batch, "training_chunks": len(train_text)}
    reached = calibrate_and_measure(model, router, calib_text, eval_text)
    kept = {k: v for k, v in config.items() if k not in ("schema_version", "router", "schedule", *reached)}
    rescaled["wall_time_s"] = round(time.perf_counter() - t0, 1)
    kept["training"] = {**training, "rescaled": rescaled}
    target = save_checkpoint(out, router, {**kept, **reached})
    return target, load_checkpoint(target)[1]


def build_ladder(folder: str | Path, levels: list[float], out: str | Path, default: float | None = None,
                 command: str = "", progress: bool = True) -> tuple[Path, dict]:
    """A ladder checkpoint (`ftp_vllm.ladder`) of one trained router at several levels: its own
    level as it is, each other one rescaled from it (`rescale_router`, without a search), all
    sharing its MLP.  Requests that name no level get `default` (the router's own level where
    it is a rung, else the highest)."""
    import tempfile

    from tqdm.auto import tqdm

    from .checkpoint import load_ladder, save_ladder

    source = load_checkpoint(folder)
    own = source[1]["target_sparsity"]
    levels = sorted({level for level in levels if level != 0})  # the dense rung is always there
    if not levels:
        raise CheckpointError("a ladder needs at least one level above 0")
    rungs = []
    with tempfile.TemporaryDirectory() as tmp:
        for level in tqdm(levels, desc="ladder rungs", disable=not progress):
            if abs(level - own) < 1e-9:
                rungs.append(source)
                continue
            made, _ = rescale_router(folder, level, Path(tmp) / f"{level:g}", command=command, progress=progress)
            rungs.append(load_checkpoint(made))
    if default is None:
        default = own if any(abs(level - own) < 1e-9 for level in levels) else levels[-1]
    target = save_ladder(out, rungs, default, command)
    return target, load_ladder(target)[1]


def add_short_thresholds(folder: str | Path, out: str | Path | None = None, command: str = "",
                         min_prompt: int | None = None) -> tuple[Path, dict]:
    """Give a checkpoint short-prompt thresholds, calibrated on the calibration chunks its
    training used (the router's MLP, schedule and other thresholds are unchanged); with
    `min_prompt`, it routes prompts from that length on, with thresholds down to it."""
    from .checkpoint import resolve_router

    old, config = load_checkpoint(folder)
    settings, model, _, calib_text, _, eval_text = _training_text(folder, config, "short-prompt thresholds")
    min_prompt = old.min_prompt if min_prompt is None else min_prompt
    router = model.new_router(min_prompt=min_prompt, short_lengths=short_prompt_lengths(min_prompt, settings.context),
                              threshold_length=settings.context)
    state = old.state_dict()
    state["threshold_short"] = router.threshold_short
    router.load_state_dict(state)
    windows = calibrate_short_thresholds(model, router, calib_text.prompts())
    config = {k: v for k, v in config.items() if k not in ("schema_version", "router", "schedule")}
    config["realised_sparsity"]["short_prompts"] = short_prompt_report(model, router, eval_text, windows)
    config["training"]["short_thresholds_command"] = command
    target = Path(out) if out is not None else resolve_router(folder)
    save_checkpoint(target, router, config)
    return target, load_checkpoint(target)[1]


def loss_summary(history: list[dict]) -> dict:
    """Each loss averaged over the first and last tenth of training."""
    if not history:
        return {}
    k = max(1, len(history) // 10)
    mean = lambda rows, key: round(sum(r[key] for r in rows) / len(rows), 4)  # noqa: E731
    return {key: {"first": mean(history[:k], key), "last": mean(history[-k:], key)} for key in history[0]}


def loss_line(training: dict) -> str:
    """Each loss on the held-back batch before -> after training; a checkpoint trained before
    that was recorded gives the first -> last tenth of training's batches instead."""
    held = training.get("held_back_loss", {})
    if "before" in held:
        return "training loss on a held-back batch (before -> after): " + ", ".join(
            f"{k} {v} -> {held['after'][k]}" for k, v in held["before"].items())
    return "training loss (first -> last tenth): " + ", ".join(
        f"{k} {v['first']} -> {v['last']}" for k, v in training["loss"].items())


def format_summary(folder: Path, config: dict) -> str:
    cal = config["realised_sparsity"]["calibration_text (thresholds fitted here)"]
    ev = config["realised_sparsity"]["evaluation_text (held out)"]
    sched = config["schedule"]
    selection = config["training"]["selection"]
    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = [
        f"router checkpoint: {folder}",
        f"base model: {config['base_model']['name']} ({config['base_model']['num_layers']} blocks)",
        f"target sparsity: prompt {config['target_sparsity']}, decode {config['decode_target_sparsity']}",
        f"prompt schedule: {fmt(sched['prompt_sparsity'])}",
        f"decode schedule: {fmt(sched['decode_sparsity'])}",
        f"realised on calibration text: prompt {cal['prompt']['mean']}, decode {cal['decode']['mean']}",
        f"realised on held-out text:    prompt {ev['prompt']['mean']}, decode {ev['decode']['mean']}",
        "realised on held-out prompts of " + ", ".join(
            f"{L}: {r['held_out_prompt_sparsity']}" for L, r in config["realised_sparsity"].get("short_prompts", {}).items())
        + " tokens (short-prompt thresholds)",
        loss_line(config["training"]),
        f"router kept: {selection['kept']} (search-text continuation KL: warm start "
        f"{selection['search_text_continuation_kl']['warm start']}, trained {selection['search_text_continuation_kl']['trained']})",
        "schedule search fitness (calibration KL): static "
        f"{config['search']['static_router']['fitness']:.4f} (uniform {config['search']['static_router']['uniform_fitness']:.4f}), "
        f"trained router {config['search']['trained_router']['fitness']:.4f} "
        f"(uniform {config['search']['trained_router']['uniform_fitness']:.4f})",
        f"{config['quality']['text']}; dense ppl {config['quality']['dense_continuation_ppl']}",
    ]
    if "rescaled" in config["training"]:
        r = config["training"]["rescaled"]
        found = r.get("search")
        how = ("schedule scaled, then searched with the router (fitness "
               f"{found['scaled_fitness']:.4f} -> {found['fitness_value']:.4f} in {found['evaluations']} evaluations)"
               if found else "schedule scaled")
        if "trained" in r:
            how += f", MLP trained further for {r['trained']['steps']} steps (the loss and kept lines)"
        took = f" in {r['wall_time_s']} s" if "wall_time_s" in r else ""
        lines.insert(3, f"rescaled from {r['from']} (target {r['from_target_sparsity']}){took}: {how}, thresholds "
                        "calibrated again; the other training, search and wall-time lines are that router's")
    for name, q in config["quality"].items():
        if isinstance(q, dict):
            lines.append(f"  {name:<28} KL {q['continuation_kl']:.4f}  ppl ratio {q['ppl_ratio_to_dense']:.3f}")
    lines.append(f"wall time: {config['training']['wall_time_s']} s {config['training']['stage_wall_time_s']}")
    return "\n".join(lines)
