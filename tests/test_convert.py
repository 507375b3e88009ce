"""Conversion: layer choice, MIL initialisation layouts, checkpoints that load anywhere, clear refusals."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from tiny import tiny_teacher, tiny_tokenizer
from typer.testing import CliRunner

from hybridize.cli import app
from hybridize.convert.checkpoint import load_hybrid, save_hybrid
from hybridize.convert.surgery import build_hybrid, query_permutation, select_layers
from hybridize.errors import UserError


def test_evenly_spaced_selection_keeps_the_first_layer_attention():
    assert select_layers(30, count=15)[0] == list(range(1, 30, 2))
    assert select_layers(30, fraction=0.5)[0] == list(range(1, 30, 2))


def test_ranking_selection_takes_least_important_first_and_counts_existing_mixers():
    chosen, how = select_layers(8, count=3, ranking=[5, 2, 7, 0], current=[2])
    assert (chosen, how) == ([2, 5, 7], "ranking")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[3, 40]), "out of range"),
        (dict(count=31), "between 1 and the layer count"),
        (dict(count=2, current=[1, 3, 5]), "already has 3"),
        (dict(count=2, layers=[1]), "exactly one"),
        (dict(fraction=1.5), "fraction"),
    ],
)
def test_bad_layer_selections_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(UserError, match=message):
        select_layers(30, **kwargs)


def _layer_weights(teacher, index):
    attn = teacher.model.layers[index].self_attn
    return {n: getattr(attn, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_apriel_layout_copies_attention_weights_in_published_order():
    teacher = tiny_teacher()
    hybrid = build_hybrid(teacher, ["attention", "mamba", "attention", "attention"], mil_layout="apriel")
    mixer, w = hybrid.model.layers[1].mixer, _layer_weights(teacher, 1)
    z, x, B, C = mixer.in_proj.weight.split([mixer.d_inner, mixer.d_xb, mixer.d_xb, mixer.d_inner])
    assert torch.equal(x, w["v_proj"]) and torch.equal(B, w["k_proj"]) and torch.equal(C, w["q_proj"])
    assert torch.equal(mixer.out_proj.weight, w["o_proj"])


def _attention_dims_read_per_channel(config, order):
    """For each mixer channel: (V dim that channel's x holds, V dim that its out_proj column expects)."""
    n, head_dim = config.mamba["d_state"], config.head_dim
    repeat = config.num_attention_heads // config.num_key_value_heads
    pairs = []
    for c in range(config.num_attention_heads * head_dim):
        x_dim = ((c // n) // repeat) * n + c % n  # group repetition of x (and of B)
        query = int(order[c])
        expected = (query // head_dim) // repeat * head_dim + query % head_dim  # GQA: kv head of that query
        pairs.append((x_dim, expected))
    return pairs


def test_aligned_layout_pairs_every_channel_with_the_slice_attention_uses():
    teacher = tiny_teacher("qwen3")  # head_dim 32 = 2 slices of d_state 16, 2 queries per kv head
    config = build_hybrid(teacher, ["attention"] * 4).config
    aligned = _attention_dims_read_per_channel(config, query_permutation(config, "aligned"))
    assert all(x == expected for x, expected in aligned)
    apriel = _attention_dims_read_per_channel(config, query_permutation(config, "apriel"))
    assert any(x != expected for x, expected in apriel)  # the published layout mixes slices


def test_aligned_layout_is_a_permutation_of_query_rows():
    teacher = tiny_teacher("qwen3")
    hybrid = build_hybrid(teacher, ["attention", "mamba", "attention", "attention"], mil_layout="aligned")
    mixer, w = hybrid.model.layers[1].mixer, _layer_weights(teacher, 1)
    C = mixer.in_proj.weight[mixer.d_inner + 2 * mixer.d_xb :]
    order = query_permutation(hybrid.config, "aligned")
    assert sorted(order.tolist()) == list(range(mixer.d_inner))
    assert torch.equal(C, w["q_proj"][order]) and torch.equal(mixer.out_proj.weight, w["o_proj"][:, order])


def test_converting_an_existing_hybrid_keeps_its_trained_mixers():
    teacher = tiny_teacher()
    first = build_hybrid(teacher, ["attention", "mamba", "attention", "attention"])
    with torch.no_grad():
        first.model.layers[1].mixer.A_log.add_(1.0)
    second = build_hybrid(first, ["attention", "mamba", "attention", "mamba"])
    assert torch.equal(second.model.layers[1].mixer.A_log, first.model.layers[1].mixer.A_log)
    with pytest.raises(UserError, match="cannot become"):
        build_hybrid(second, ["attention", "attention", "attention", "mamba"])


@pytest.fixture(scope="module")
def saved_hybrid(tmp_path_factory):
    teacher = tiny_teacher()
    hybrid = build_hybrid(teacher, ["attention", "mamba", "identity", "mamba"])
    with torch.no_grad():
        for param in hybrid.parameters():  # every weight differs from any init, so a re-init would show
            param.add_(torch.randn_like(param) * 0.01)
    out = tmp_path_factory.mktemp("ckpt") / "hybrid"
    save_hybrid(hybrid, None, out)
    return hybrid, out


def test_saved_checkpoint_reloads_with_identical_weights(saved_hybrid):
    hybrid, out = saved_hybrid
    loaded, _ = load_hybrid(out)
    for (name, a), b in zip(hybrid.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((out / "layers.json").read_text())["mixer_types"] == hybrid.config.mixer_types
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():  # computed buffers (RoPE frequencies) must be rebuilt, not only weights loaded
        assert torch.equal(hybrid(ids).logits, loaded(ids).logits)


REMOTE_SCRIPT = """
import sys, torch
try:
    import hybridize
    sys.exit("hybridize is importable in the isolated environment")
except ImportError:
    pass
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "tokens": tokens, "module": type(model).__module__}, sys.argv[3])
"""


def test_checkpoint_runs_with_stock_transformers_where_hybridize_is_not_installed(saved_hybrid, tmp_path):
    hybrid, out = saved_hybrid
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    # torch and transformers from this environment's site-packages, without processing its .pth files
    # (the editable install of hybridize lives in one of those)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    ids = torch.randint(0, 96, (2, 12))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    python = env_dir / "bin" / "python"
    result = subprocess.run([str(python), "-c", REMOTE_SCRIPT, str(out), str(tmp_path / "ids.pt"),
                             str(tmp_path / "result.pt")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    remote = torch.load(tmp_path / "result.pt")
    assert remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local_logits = hybrid(ids).logits
    assert (remote["logits"] - local_logits).abs().max() <= 1e-5
    local_tokens = hybrid.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["tokens"], local_tokens)


def _truncate(path: Path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupted_weights_are_refused_with_the_file_named(saved_hybrid, tmp_path, damage):
    _, out = saved_hybrid
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    weights = copy / "model.safetensors"
    if damage == "truncated":
        _truncate(weights, lambda n: n - 100)
    else:
        data = bytearray(weights.read_bytes())
        data[10:20] = b"##########"
        weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors"):
        load_hybrid(copy)


runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "llama"
    tiny_teacher().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_converts_a_teacher_directory(teacher_dir, tmp_path):
    result = _cli("convert", "--teacher", str(teacher_dir), "--layers", "1,3", "--out", str(tmp_path / "h"))
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "h" / "layers.json").read_text())
    assert info["mixer_types"] == ["attention", "mamba", "attention", "mamba"] and info["selection"] == "explicit"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "/no/such/model", "--count", "1"], "neither an existing path"),
        (["--layers", "1,9"], "out of range"),
        (["--count", "5"], "between 1 and the layer count"),
        (["--layers", "x"], "comma-separated"),
        (["--count", "1", "--mil-layout", "diagonal"], "MIL layout"),
    ],
)
def test_cli_bad_input_exits_2_with_one_sentence_and_writes_nothing(teacher_dir, tmp_path, args, message):
    if "--teacher" not in args:
        args = ["--teacher", str(teacher_dir), *args]
    out = tmp_path / "out"
    result = _cli("convert", *args, "--out", str(out))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_refuses_unsupported_model_type_before_loading(tmp_path):
    model_dir = tmp_path / "gpt2"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = _cli("convert", "--teacher", str(model_dir), "--count", "1", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "llama, mistral, qwen2, qwen3" in result.output


def test_cli_never_overwrites_a_checkpoint_without_overwrite(teacher_dir, tmp_path):
    out = tmp_path / "h"
    assert _cli("convert", "--teacher", str(teacher_dir), "--count", "1", "--out", str(out)).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    result = _cli("convert", "--teacher", str(teacher_dir), "--count", "2", "--out", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "model.safetensors").read_bytes() == before
    result = _cli("convert", "--teacher", str(teacher_dir), "--count", "2", "--out", str(out), "--overwrite")
    assert result.exit_code == 0
    assert json.loads((out / "layers.json").read_text())["mixer_types"].count("mamba") == 2


def test_cli_reports_a_corrupted_checkpoint_as_a_teacher(saved_hybrid, tmp_path):
    _, out = saved_hybrid
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    _truncate(copy / "model.safetensors", lambda n: n // 2)
    result = _cli("inspect", str(copy))
    assert result.exit_code == 2 and "truncated or corrupted" in result.output


def test_main_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hybridize.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout
