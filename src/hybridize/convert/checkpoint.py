"""Saving and loading hybrid checkpoints as self-contained Hugging Face directories.

A checkpoint holds safetensors weights, config.json with `auto_map`, the tokenizer, `layers.json`
(which layer holds which mixer and why), and copies of the model files, so it loads with stock
transformers and `trust_remote_code=True` where hybridize is not installed. Writes go to a staging
directory beside the target that is renamed into place: a crash never leaves half a checkpoint,
and an existing checkpoint is only replaced when asked to.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hybridize.errors import UserError
from hybridize.faults import kill_point
from hybridize.modeling import configuration_hybrid, mamba_ops, modeling_hybrid

MODEL_FILES = [Path(m.__file__) for m in (configuration_hybrid, modeling_hybrid, mamba_ops)]


def check_output_dir(path, overwrite=False):
    """Refuse an existing non-empty output directory unless overwrite is set."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output directory {path} is not empty; pass --overwrite to replace it")


def write_json_atomic(path, data):
    path = Path(path)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(staging, path)


def save_hybrid(model, tokenizer, out_dir, layers_info=None, overwrite=False, dtype=None, extra=None):
    """Write a loadable checkpoint to `out_dir` atomically; returns the path.

    `extra` maps names to files or folders copied in beside the weights (training metrics, events).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging."))
    try:
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(staging)
        for source in MODEL_FILES:
            shutil.copyfile(source, staging / source.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        info = {"mixer_types": list(model.config.mixer_types), **(layers_info or {})}
        write_json_atomic(staging / "layers.json", info)
        for name, source in (extra or {}).items():
            source = Path(source)
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.is_file():
                shutil.copyfile(source, staging / name)
        kill_point("checkpoint-staged")
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
            os.replace(out_dir, retired / "checkpoint")
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_weights(path: Path):
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {path} has no .safetensors weights")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # touching each tensor verifies its byte range lies in the file
                    handle.get_slice(key)
            expected = _declared_size(file)
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"weights file {file} is truncated or corrupted ({str(error).splitlines()[0]})") from None
        if expected != file.stat().st_size:
            raise UserError(f"weights file {file} is truncated or corrupted (size differs from its header)")


def _declared_size(file: Path) -> int:
    """Size a safetensors file must have: 8-byte header length + header + the end of the last tensor."""
    with open(file, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + header_length + end


def load_hybrid(path, dtype=torch.float32, device="cpu"):
    """Returns (model, tokenizer or None) for a hybrid checkpoint directory."""
    from transformers import AutoTokenizer

    from hybridize.modeling.configuration_hybrid import HybridConfig
    from hybridize.modeling.modeling_hybrid import HybridForCausalLM

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config_file} is not valid JSON") from None
    if model_type != "hybrid":
        raise UserError(f"{path} holds a {model_type!r} model, not a hybrid checkpoint")
    _check_weights(path)
    try:
        config = HybridConfig.from_pretrained(path)
        model = HybridForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as error:
        raise UserError(f"could not load {path}: {str(error).splitlines()[0]}") from None
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return materialize(model).to(device).eval(), tokenizer


@torch.no_grad()
def materialize(model):
    """Copy memory-mapped weights into ordinary memory: mapped tensors make CPU matmuls ~20x slower."""
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def load_layers_info(path) -> dict:
    file = Path(path) / "layers.json"
    return json.loads(file.read_text()) if file.is_file() else {}
