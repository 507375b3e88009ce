"""The decode engine and `bench` on CPU: greedy tokens equal to transformers' generate(), the steady-state
and full-generation measurements, batch sizing, layouts, and the result table."""

import json
import sys
from pathlib import Path

import pytest
import torch
from triton_interpreter import PATCH

from hybridize.bench import runner, shapes
from hybridize.bench.engine import DecodeEngine, attention_twin, greedy_agreement, greedy_gate, hybrid_sharing
from hybridize.convert.surgery import build_hybrid
from hybridize.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_teacher  # noqa: E402

HYBRID_LAYOUT = ["mamba", "attention", "identity", "mamba"]


@pytest.mark.parametrize("family", ["llama", "llama-tied", "llama3-rope-bias", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["twin", "hybrid"])
def test_engine_greedy_tokens_equal_generate(family, layout):
    teacher = tiny_teacher(family)
    model = attention_twin(teacher) if layout == "twin" else build_hybrid(teacher, HYBRID_LAYOUT)
    assert greedy_gate(model, batch=3, prompt_len=7, new_tokens=20)["equal"]


@pytest.mark.parametrize("layout", ["twin", "hybrid"])
def test_engine_matches_generate_for_64_varied_tokens_at_smollm2_width(layout):
    """SmolLM2-135M's widths (576 hidden, 9/3 heads, vocab 49152, tied) with 4 layers, perturbed so that
    greedy output does not repeat one token; the full 30 layers are the slow test below."""
    from dataclasses import replace

    shape = replace(shapes.get_shape("smollm2-135m"), name="smollm2-4-layers", num_hidden_layers=4)
    teacher = shapes.varied_teacher(shape)
    model = attention_twin(teacher) if layout == "twin" else build_hybrid(teacher, ["mamba", "attention"] * 2)
    report = greedy_gate(model, batch=2, prompt_len=16, new_tokens=64)
    assert report["equal"], report
    assert report["distinct_tokens"] > 32


@pytest.mark.parametrize("prefill_tokens", [3, 8, 8192])  # 1, 2 and all prompt tokens per chunk
def test_chunked_prefill_gives_the_same_tokens(prefill_tokens):
    model = build_hybrid(tiny_teacher("llama"), HYBRID_LAYOUT)
    assert greedy_gate(model, batch=3, prompt_len=9, new_tokens=12, prefill_tokens=prefill_tokens)["equal"]


def test_engine_runs_the_teacher_itself_through_its_twin():
    teacher = tiny_teacher("llama")
    twin = attention_twin(teacher)
    assert twin.model.layers[0].mixer.q_proj.weight.data_ptr() == teacher.model.layers[0].self_attn.q_proj.weight.data_ptr()
    ids = torch.randint(3, 96, (2, 5))
    want = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, 5:]
    assert torch.equal(DecodeEngine(teacher, 2, 15).generate(ids, 10), want)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["twin", "hybrid"])
def test_engine_matches_generate_on_smollm2_shaped_models(layout):
    torch.set_num_threads(1)  # tiny matmuls: threads only contend
    teacher = shapes.varied_teacher("smollm2-135m")
    model = attention_twin(teacher) if layout == "twin" else build_hybrid(
        teacher, shapes.mixer_types_for(30, 15))
    report = greedy_gate(model, batch=2, prompt_len=16, new_tokens=64)
    assert report["equal"], report
    assert report["distinct_tokens"] > 64


def test_greedy_agreement_reports_first_divergence_and_its_gap():
    reference = torch.tensor([[1, 2, 3], [4, 5, 6]])
    engine = torch.tensor([[1, 2, 3], [4, 7, 6]])
    logits = [torch.zeros(2, 8) for _ in range(3)]
    for step in logits:
        step[:, 0] = 10.0  # top-2 gap 10 elsewhere
    logits[1][1, 5], logits[1][1, 7] = 3.0, 2.99
    report = greedy_agreement(engine, reference, logits)
    assert (report["equal"], report["first_divergence_step"], report["sequence"]) == (False, 1, 1)
    assert report["logit_gap"] == pytest.approx(0.01, abs=1e-4) and report["near_tie"]


def test_hybrid_sharing_shares_weights_and_adds_fresh_mixers():
    teacher = tiny_teacher("llama")
    hybrid = hybrid_sharing(teacher, HYBRID_LAYOUT)
    assert hybrid.model.layers[1].mixer.q_proj.weight.data_ptr() == teacher.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert hybrid.model.layers[0].mlp.up_proj.weight.data_ptr() == teacher.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert not any(p.is_meta for p in hybrid.parameters())
    assert DecodeEngine(hybrid, 2, 12).generate(torch.randint(3, 96, (2, 4)), 8).shape == (2, 8)


def test_steady_state_steps_advance_every_sequence():
    model = build_hybrid(tiny_teacher("llama"), HYBRID_LAYOUT)
    engine = DecodeEngine(model, batch=2, max_len=64)
    engine.fill_synthetic(30)
    ms = engine.time_steps(3, repeats=3)
    assert ms > 0
    assert engine.lengths.tolist() == [39, 39]
    assert not torch.equal(engine.ssm_states[0], torch.zeros_like(engine.ssm_states[0]))


def test_engine_refuses_a_sliding_window_shorter_than_its_cache():
    with pytest.raises(UserError, match="sliding-window"):
        DecodeEngine(tiny_teacher("mistral-window"), batch=1, max_len=32)
    DecodeEngine(tiny_teacher("mistral-window"), batch=1, max_len=7)  # within the window: exact


def test_engine_refuses_the_triton_backend_without_cuda():
    with pytest.raises(UserError, match="CUDA"):
        DecodeEngine(tiny_teacher("llama"), batch=1, max_len=8, attention="triton")


def test_bench_tiny_shape_steady_rows_ratios_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = runner.bench(shapes.get_shape("tiny"), mixer_layers=[2, 3], input_len=4, output_len=40, batch=2,
                          mode="steady", steps=2, stock_steps=2, json_path=out)
    rows = result["rows"]
    assert [(r["model"], r["path"]) for r in rows] == [
        ("teacher", "engine"), ("teacher", "stock"), ("hybrid 2/4", "engine"), ("hybrid 2/4", "stock"),
        ("hybrid 3/4", "engine"), ("hybrid 3/4", "stock")]
    assert result["context"] == 24 and "steady-state" in result["note"]
    for row in rows:
        assert row["batch"] == 2 and row["tok_s"] > 0 and row["roofline_tok_s"] > 0
        assert row["ratio_vs_teacher"] > 0 and row["roofline_ratio"] > 0
    assert rows[0]["ratio_vs_teacher"] == 1.0
    assert [r["mixer_layers"] for r in rows[::2]] == [0, 2, 3]
    assert json.loads(out.read_text())["rows"][2]["model"] == "hybrid 2/4"
    printed = capsys.readouterr().out
    assert "| hybrid 3/4 | stock | 3 | 2 |" in printed and "steady-state decode at context 24" in printed


def test_bench_full_generation_with_a_layout_file(tmp_path):
    layout = tmp_path / "layers.json"
    layout.write_text(json.dumps({"mixer_types": HYBRID_LAYOUT}))
    result = runner.bench("tiny", layout=layout, input_len=3, output_len=6, batch=2, mode="full",
                          include_stock=False, echo=False)
    assert [r["model"] for r in result["rows"]] == ["teacher", "hybrid 2/4"]
    assert all(r["wall_s"] > 0 and r["prefill_ms"] > 0 for r in result["rows"])


def test_bench_auto_batch_fills_the_given_memory_and_refuses_when_nothing_fits():
    config = shapes.get_shape("tiny").hybrid_config()
    per_sequence = runner.cache_bytes_per_sequence(config, 64, torch.float32) + runner._per_sequence_extra(config)
    memory = runner._reserve_bytes(config, "steady", 8192) + 3 * per_sequence + 10
    result = runner.bench("tiny", input_len=32, output_len=32, memory=memory, include_stock=False, steps=1,
                          echo=False)
    assert result["rows"][0]["batch"] == 3
    with pytest.raises(UserError, match="not even one sequence of 64 tokens fits"):
        runner.bench("tiny", input_len=32, output_len=32, memory=1000, echo=False)


def test_auto_batch_arithmetic():
    assert runner.auto_batch(100, 30, 10) == 3
    assert runner.auto_batch(100, 30, 90) == 0
    assert runner.auto_batch(10**12, 1, 0, cap=64) == 64


def test_bench_hybrid_checkpoint_against_its_teacher_directory(tmp_path):
    from tiny import tiny_tokenizer

    from hybridize.convert.checkpoint import save_hybrid

    teacher = tiny_teacher("llama")
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tiny_tokenizer().save_pretrained(teacher_dir)
    save_hybrid(build_hybrid(teacher, HYBRID_LAYOUT), tiny_tokenizer(), tmp_path / "student")
    result = runner.bench(str(tmp_path / "student"), teacher=str(teacher_dir), input_len=2, output_len=20,
                          batch=2, steps=2, stock_steps=2, echo=False)
    assert [(r["model"], r["path"]) for r in result["rows"]] == [
        ("teacher", "engine"), ("teacher", "stock"), ("hybrid 2/4", "engine"), ("hybrid 2/4", "stock")]
    with pytest.raises(UserError, match="already a hybrid"):
        runner.bench(str(tmp_path / "student"), mixer_layers=2, echo=False)
    with pytest.raises(UserError, match="not a hybrid"):
        runner.bench(str(teacher_dir), teacher=str(teacher_dir), echo=False)
    plain = runner.bench(str(teacher_dir), mixer_layers=[1], input_len=2, output_len=20, batch=1, steps=1,
                         include_stock=False, echo=False)
    assert [r["model"] for r in plain["rows"]] == ["teacher", "hybrid 1/4 (random mixers)"]


def test_bench_rejects_bad_arguments():
    with pytest.raises(UserError, match="mode"):
        runner.bench("tiny", mode="fast")
    with pytest.raises(UserError, match="batch"):
        runner.bench("tiny", batch=0)
    with pytest.raises(UserError, match="between 1 and the layer count 4"):
        runner.bench("tiny", mixer_layers=9)
    with pytest.raises(UserError, match="not both"):
        runner.bench("tiny", mixer_layers=1, layout=["mamba"] * 4)
    with pytest.raises(UserError, match="unknown shape"):
        shapes.get_shape("gpt-5")


def test_presets_have_the_published_shapes():
    apriel = shapes.get_shape("apriel-15b").hybrid_config()
    assert (apriel.num_hidden_layers, apriel.hidden_size, apriel.num_attention_heads, apriel.num_key_value_heads,
            apriel.head_dim, apriel.intermediate_size, apriel.vocab_size) == (50, 5120, 32, 8, 128, 14336, 131072)
    llama = shapes.get_shape("llama3-8b").hybrid_config()
    assert llama.rope["rope_type"] == "llama3" and llama.vocab_size == 128256
    smol = shapes.get_shape("smollm2-135m").hybrid_config()
    assert smol.tie_word_embeddings and (smol.num_hidden_layers, smol.hidden_size) == (30, 576)


def test_layouts_evenly_spaced_and_from_files(tmp_path):
    assert shapes.evenly_spaced(50, 25) == list(range(1, 50, 2))
    assert len(set(shapes.evenly_spaced(50, 40))) == 40
    assert shapes.mixer_types_for(4, layers=[0, 3]) == ["mamba", "attention", "attention", "mamba"]
    file = tmp_path / "layers.json"
    file.write_text(json.dumps({"mixer_layers": [1, 2]}))
    assert shapes.read_layout(file, 4) == ["attention", "mamba", "mamba", "attention"]
    file.write_text(json.dumps([3]))
    assert shapes.read_layout(file, 4)[3] == "mamba"
    file.write_text(json.dumps({"mixer_types": ["mamba"] * 3}))
    with pytest.raises(UserError, match="4 entries"):
        shapes.read_layout(file, 4)
    file.write_text(json.dumps([7]))
    with pytest.raises(UserError, match="layer 7"):
        shapes.read_layout(file, 4)
    with pytest.raises(UserError, match="does not exist"):
        shapes.read_layout(tmp_path / "missing.json", 4)


def test_roofline_counts_only_weights_a_step_reads():
    untied, tied = tiny_teacher("llama"), tiny_teacher("llama-tied")
    embed = untied.model.embed_tokens.weight.numel()
    assert runner.parameters_read(untied) == sum(p.numel() for p in untied.parameters()) - embed
    assert runner.parameters_read(tied) == sum(p.numel() for p in tied.parameters())


KERNEL_CHECK = PATCH + """
import torch, torch.nn.functional as F
from hybridize.bench.decode_attention import DecodeAttention, rope_append
from hybridize.modeling.modeling_hybrid import apply_rotary
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):  # the interpreter mishandles bf16; tests/gpu covers it
    b, h, kv, d, length = 3, 6, 2, 32, 300
    q = torch.randn(b, 1, h * d, dtype=dtype).view(b, h, d)
    k, v = torch.randn(b, kv, d, dtype=dtype), torch.randn(b, kv, d, dtype=dtype)
    cos, sin = torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=dtype)
    positions = torch.tensor([5, 0, 299])
    keys = torch.full((b, kv, length, d), float("nan"), dtype=dtype)
    values = keys.clone()
    q_rot = rope_append(q, k, v, cos, sin, positions, keys, values)
    assert torch.equal(q_rot, apply_rotary(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0])
    rows = torch.arange(b)
    assert torch.equal(keys[rows, :, positions], apply_rotary(k[:, :, None], cos[:, None], sin[:, None])[:, :, 0])
    assert torch.equal(values[rows, :, positions], v)
    keys, values = torch.randn(b, kv, length, d, dtype=dtype), torch.randn(b, kv, length, d, dtype=dtype)
    lengths = torch.tensor([1, 77, 300])
    attention = DecodeAttention(b, h, kv, d, length, torch.device("cpu"), dtype, splits=4, block_n=32)
    got = attention(q_rot, keys, values, lengths).double()
    mask = torch.arange(length)[None, :] < lengths[:, None]
    want = F.scaled_dot_product_attention(q_rot.double()[:, :, None], keys.double(), values.double(),
                                          attn_mask=mask[:, None, None], enable_gqa=True)[:, :, 0]
    error = ((got - want).norm() / want.norm()).item()
    assert error < (1e-6 if dtype == torch.float32 else 1e-3), (dtype, error)
print("ok")
"""


def test_decode_attention_kernels_in_the_triton_interpreter():
    """RoPE + append (bit-exact to the model's eager rotary) and split-KV attention against SDPA in
    float64, run by Triton's CPU interpreter in a fresh process (it must be on before Triton loads).
    Skipped where Triton is not installed (CI); tests/gpu runs the compiled kernels."""
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
