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


def load_checkpoint(name_or_path: str | Path) -> tuple[Router, dict]:
    """(Router, config) from a checkpoint folder or shipped router name, fully validated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_router(name_or_path)
    for f in (CONFIG_FILE, ROUTER_FILE):
        if not (folder / f).is_file():
            raise CheckpointError(f"{folder}: missing {f}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("schema_version") != SCHEMA_VERSION:
        found = config.get("schema_version") if isinstance(config, dict) else None
        raise CheckpointError(f"{folder / CONFIG_FILE}: schema version {found!r}, this ftp_vllm reads {SCHEMA_VERSION}")
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
    try:
        state = load_file(str(folder / ROUTER_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ROUTER_FILE}: unreadable ({e})") from None
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
    return router, config
