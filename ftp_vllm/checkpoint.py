"""Router checkpoints: a folder with `router.safetensors` and `ftp_config.json`.

router.safetensors  the Router's state (MLP weights and its buffers).  It is the
                    authority for every tensor; thresholds may be -inf (block
                    keeps all) or +inf (skips every free token), so only the
                    MLP weights must be finite.
ftp_config.json     what the router is for and how it was made: schema version,
                    base-model fingerprint, router shape, schedules, training
                    data and settings, realised sparsities and measured quality.
                    Schedules and thresholds are repeated there for people
                    (non-finite numbers written as the strings "inf"/"-inf").

A ladder checkpoint (schema 3, `save_ladder`) holds several operating points of
one router (`ftp_vllm.ladder`): the shared tensors once, each per-level tensor
with the levels stacked first, and in its config a `ladder` record of the levels,
the default one and each rung's targets, realised sparsity and quality.

A router only makes sense on the weights it was trained on, so the config
carries a fingerprint of the base model (`fingerprint`) that a server checks
at start-up (`check_compatible`) by reading a few kilobytes of the model files.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from . import BASE_ARCHITECTURES
from .router import HIDDEN, MIN_ROUTED_PROMPT, Router

SCHEMA_VERSION = 2
LADDER_SCHEMA_VERSION = 3  # a ladder of operating points (`save_ladder`)
LEVEL_TENSORS = ("sparsity", "decode_sparsity", "threshold_prompt", "threshold_decode", "threshold_short")
RUNG_FIELDS = ("target_sparsity", "decode_target_sparsity", "realised_sparsity", "quality")
ROUTER_FILE = "router.safetensors"
CONFIG_FILE = "ftp_config.json"
SHIPPED = Path(__file__).parent / "routers"
SAMPLES_PER_TENSOR = 64
SAMPLE_BYTES = 16
FINGERPRINT_KEYS = ("architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "weights_sha256")


class CheckpointError(ValueError):
    """A router checkpoint is missing, damaged or made for another model; the message names the path."""


# ---- base-model fingerprint ---------------------------------------------------

def weights_hash(model_folder: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and SAMPLES_PER_TENSOR evenly strided byte
    windows of its data, read straight from the safetensors files (no framework, milliseconds):
    enough to tell apart two models of one shape, or a re-quantised copy."""
    digest = hashlib.sha256()
    files = sorted(Path(model_folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_folder}: no *.safetensors weights to fingerprint")
    entries = []
    for f in files:
        with open(f, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
            base = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                size = end - start
                n = min(SAMPLES_PER_TENSOR, max(1, size // SAMPLE_BYTES))
                samples = []
                for i in range(n):
                    fh.seek(base + start + max(0, size - SAMPLE_BYTES) * i // max(1, n - 1))
                    samples.append(fh.read(min(SAMPLE_BYTES, size)))
                entries.append((name, info["dtype"], info["shape"], b"".join(samples)))
    for name, dtype, shape, data in sorted(entries, key=lambda e: e[0]):
        digest.update(f"{name}|{dtype}|{shape}|".encode())
        digest.update(data)
    return digest.hexdigest()


def _base_architecture(config: dict) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    return {ftp: base for base, ftp in BASE_ARCHITECTURES.items()}.get(arch, arch)


def fingerprint(model_folder: str | Path) -> dict:
    """What identifies a base model to a router: architecture, shape and a weights hash."""
    folder = Path(model_folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read the model config ({e})") from None
    return {
        "architecture": _base_architecture(config),
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_heads": config["num_attention_heads"],
        "num_kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
        "weights_sha256": weights_hash(folder),
    }


def check_compatible(config: dict, model_folder: str | Path) -> None:
    """Raise CheckpointError naming every fingerprint field where the router's base model and
    the model in `model_folder` differ."""
    expected, actual = config["base_model"], fingerprint(model_folder)
    diffs = [f"{k}: router {expected.get(k)!r}, model {actual[k]!r}" for k in FINGERPRINT_KEYS if expected.get(k) != actual[k]]
    if diffs:
        name = config.get("base_model", {}).get("name", "its base model")
        raise CheckpointError(
            f"router was trained for {name}, not the model in {model_folder} ({'; '.join(diffs)})"
        )


# ---- save / load --------------------------------------------------------------

def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def router_shape(router: Router) -> dict:
    return {
        "num_blocks": router.num_blocks,
        "num_kv_heads": router.mean_query.shape[1],
        "head_dim": router.mean_query.shape[2],
        "hidden": router.mlp.fc1.out_features,
        "min_prompt": router.min_prompt,
        "short_prompt_lengths": router.short_lengths,
        "threshold_length": router.threshold_length,
    }


def save_checkpoint(folder: str | Path, router: Router, config: dict) -> Path:
    """Write the router and `config` (which must hold "base_model", a `fingerprint`), adding
    the schema version, the router's shape and readable copies of its schedules and thresholds."""
    from safetensors.torch import save_file

    if "base_model" not in config:
        raise CheckpointError(f"{folder}: config needs a 'base_model' fingerprint")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    save_file(state, str(folder / ROUTER_FILE), metadata={"format": "pt"})
    full = {
        "schema_version": SCHEMA_VERSION,
        **config,
        "router": router_shape(router),
        "schedule": {
            "prompt_sparsity": router.sparsity.tolist(),
            "decode_sparsity": router.decode_sparsity.tolist(),
            "threshold_prompt": router.threshold_prompt.tolist(),
            "threshold_decode": router.threshold_decode.tolist(),
            "threshold_short": router.threshold_short.tolist(),
        },
    }
    (folder / CONFIG_FILE).write_text(json.dumps(_json_safe(full), indent=2, allow_nan=False) + "\n")
    return folder


def resolve_router(name_or_path: str | Path) -> Path:
    """A bare name (no path separator, not an existing path) is a router shipped in
    `ftp_vllm/routers/<name>/`; anything else is a folder path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and "/" not in text and "\\" not in text and not text.startswith((".", "~")):
        shipped = SHIPPED / text
        if not shipped.is_dir():
            known = ", ".join(sorted(p.name for p in SHIPPED.iterdir() if p.is_dir())) if SHIPPED.is_dir() else "none"
            raise CheckpointError(f"no shipped router named {text!r} (in {SHIPPED}; shipped: {known})")
        return shipped
    if not path.is_dir():
        raise CheckpointError(f"router checkpoint folder {path} does not exist")
    return path


def router_levels(specs: list[str]) -> list[tuple[str, float | None]]:
    """Routers as benchmarks name them, as (name or path, level): `NAME@0.2` is a ladder's
    level 0.2; a bare ladder stands for each of its levels above 0; any other name for itself."""
    out = []
    for spec in specs:
        name, at, level = str(spec).rpartition("@") if "@" in str(spec) else (str(spec), "", "")
        if at:
            try:
                out.append((name, float(level)))
            except ValueError:
                raise CheckpointError(f"{spec}: the level after @ must be a number") from None
            continue
        config, _ = _read(resolve_router(name))
        if "ladder" in config:
            out += [(name, float(x)) for x in config["ladder"]["levels"]]
        else:
            out.append((name, None))
    return out


def router_label(name: str, level: float | None) -> str:
    """How results name a router (and its level, for a ladder's)."""
    return resolve_router(name).name + ("" if level is None else f"@{level:g}")


def load_checkpoint(name_or_path: str | Path, level: float | None = None) -> tuple[Router, dict]:
    """(Router, config) from a checkpoint folder or shipped name, fully validated.  Of a ladder
    (`load_ladder`), the rung at `level` (default: the ladder's default), with its config."""
    folder = resolve_router(name_or_path)
    config, state = _read(folder)
    if "ladder" not in config:
        if level is not None:
            raise CheckpointError(f"{folder}: not a ladder checkpoint; it has one level, {config.get('target_sparsity')}")
        return _router(folder, config, state), config
    ladder = _ladder(folder, config, state)
    rung = ladder.rung_index(None if level is None else _checked(ladder, level, folder))
    if rung == 0:
        raise CheckpointError(f"{folder}: level {level} is the dense model, no router")
    info = config["ladder"]["rungs"][rung - 1]
    return ladder.rungs[rung], {**config, **{k: v for k, v in info.items() if k != "level"}}


def load_ladder(name_or_path: str | Path):
    """(Ladder, config) from a checkpoint folder or shipped name: a ladder checkpoint's rungs, or
    a single-level checkpoint as the ladder of the dense model and its router."""
    folder = resolve_router(name_or_path)
    config, state = _read(folder)
    return _ladder(folder, config, state), config


def _ladder(folder: Path, config: dict, state: dict):
    """The Ladder of a checkpoint's config and tensors (`load_ladder`), validated."""
    from .ladder import Ladder

    if "ladder" not in config:
        router = _router(folder, config, state)
        return Ladder([router], [float(config.get("target_sparsity") or router.sparsity.mean())])
    try:
        levels, default = [float(x) for x in config["ladder"]["levels"]], float(config["ladder"]["default"])
        if len(config["ladder"]["rungs"]) != len(levels):
            raise ValueError(f"{len(config['ladder']['rungs'])} rung records for {len(levels)} levels")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad ladder record ({e!r})") from None
    stacked = {k: v for k, v in state.items() if k in LEVEL_TENSORS}
    wrong = [f"{k}: {list(v.shape)}, expected {len(levels)} levels first" for k, v in stacked.items()
             if v.dim() == 0 or len(v) != len(levels)]
    if wrong:
        raise CheckpointError(f"{folder / ROUTER_FILE}: wrong tensors ({'; '.join(wrong)})")
    rungs = [_router(folder, config, {**state, **{k: v[i] for k, v in stacked.items()}}) for i in range(len(levels))]
    try:
        return Ladder(rungs, levels, default)
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None


def _checked(ladder, level, folder) -> float:
    try:
        return ladder.check_level(level)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def save_ladder(folder: str | Path, rungs: list[tuple[Router, dict]], default: float, command: str = "") -> Path:
    """Write routers that share one MLP, mean queries and feature statistics (rungs of a ladder,
    each with its checkpoint config, e.g. made by `ftp-vllm rescale` from one router) as one
    ladder checkpoint: the shared tensors once, the per-level ones (`LEVEL_TENSORS`) stacked by
    level.  The config's top level describes the `default` rung, as a single-level config would."""
    from safetensors.torch import save_file

    rungs = sorted(rungs, key=lambda rc: rc[1]["target_sparsity"])
    levels = [float(c["target_sparsity"]) for _, c in rungs]
    first, first_config = rungs[0]
    first_state = first.state_dict()
    for router, config in rungs[1:]:
        shared = [k for k, v in router.state_dict().items()
                  if k not in LEVEL_TENSORS and not torch.equal(v, first_state[k])]
        if shared or router_shape(router) != router_shape(first) or config["base_model"] != first_config["base_model"]:
            raise CheckpointError(f"rungs at {levels[0]} and {config['target_sparsity']} differ in "
                                  f"{', '.join(shared) or 'shape or base model'}: a ladder's rungs share one router")
    if default not in levels or len(set(levels)) != len(levels):
        raise CheckpointError(f"default level {default} must be one of the rungs' distinct levels {levels}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in first_state.items() if k not in LEVEL_TENSORS}
    for k in LEVEL_TENSORS:
        state[k] = torch.stack([r.state_dict()[k].detach().cpu() for r, _ in rungs]).contiguous()
    save_file(state, str(folder / ROUTER_FILE), metadata={"format": "pt"})
    rung_records = [{"level": level, **{k: c[k] for k in RUNG_FIELDS if k in c}, "made_by": _made_by(c),
                     "schedule": c.get("schedule")} for level, (_, c) in zip(levels, rungs)]
    top = rungs[levels.index(default)][1]
    full = {
        "schema_version": LADDER_SCHEMA_VERSION,
        "base_model": first_config["base_model"],
        **{k: top[k] for k in RUNG_FIELDS if k in top},
        "ladder": {"levels": levels, "default": default, "command": command, "rungs": rung_records},
        "router": router_shape(first),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(_json_safe(full), indent=2, allow_nan=False) + "\n")
    return folder


def _made_by(config: dict) -> str:
    training = config.get("training", {})
    return training.get("rescaled", {}).get("command") or training.get("command", "")


def _read(folder: Path) -> tuple[dict, dict]:
    """(config, tensors) of a checkpoint folder, the config's schema checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for f in (CONFIG_FILE, ROUTER_FILE):
        if not (folder / f).is_file():
            raise CheckpointError(f"{folder}: missing {f}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable JSON ({e})") from None
    found = config.get("schema_version") if isinstance(config, dict) else None
    ladder = isinstance(config, dict) and "ladder" in config
    if found != (LADDER_SCHEMA_VERSION if ladder else SCHEMA_VERSION):
        raise CheckpointError(f"{folder / CONFIG_FILE}: schema version {found!r}, this ftp_vllm reads "
                              f"{SCHEMA_VERSION} (one level) and {LADDER_SCHEMA_VERSION} (a ladder)")
    try:
        state = load_file(str(folder / ROUTER_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ROUTER_FILE}: unreadable ({e})") from None
    return config, state


def _router(folder: Path, config: dict, state: dict) -> Router:
    """A Router from a checkpoint's config and one level's tensors, validated."""
    try:
        shape = config["router"]
        router = Router(shape["num_blocks"], shape["num_kv_heads"], shape["head_dim"], shape.get("hidden", HIDDEN),
                        shape.get("min_prompt", MIN_ROUTED_PROMPT), shape.get("short_prompt_lengths", []),
                        shape.get("threshold_length", 0))
        base_layers = config["base_model"]["num_layers"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: missing field {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None
    if shape["num_blocks"] != base_layers:
        raise CheckpointError(f"{folder / CONFIG_FILE}: router has {shape['num_blocks']} blocks, its base model {base_layers} layers")
    state = dict(state)
    if not router.short_lengths:  # written before short-prompt thresholds existed
        state.setdefault("threshold_short", router.threshold_short)
    expected = router.state_dict()
    wrong = [f"{k}: {list(state[k].shape) if k in state else 'missing'}, expected {list(v.shape)}"
             for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    wrong += [f"{k}: unexpected" for k in state if k not in expected]
    if wrong:
        raise CheckpointError(f"{folder / ROUTER_FILE}: wrong tensors ({'; '.join(wrong)})")
    bad = [k for k in state if k.startswith("mlp.") and not torch.isfinite(state[k]).all()]
    bad += [k for k in state if not k.startswith("mlp.") and torch.isnan(state[k]).any()]
    if bad:
        raise CheckpointError(f"{folder / ROUTER_FILE}: non-finite values in {', '.join(bad)}")
    router.load_state_dict(state)
    return router
