"""The decode engine on CUDA: its Triton kernels against references, CUDA-graph decoding against
transformers' generate() in bf16, and `bench` end to end on a small shape (CUDA only)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from gpu_checks import rel_err

from hybridize.bench import runner, shapes
from hybridize.bench.engine import DecodeEngine, attention_twin, greedy_gate
from hybridize.convert.surgery import build_hybrid
from hybridize.modeling.modeling_hybrid import apply_rotary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
def test_rope_append_is_bit_exact_and_decode_attention_matches_sdpa(dtype, heads, kv_heads, head_dim):
    from hybridize.bench.decode_attention import DecodeAttention, rope_append

    b, length = 5, 3000
    dev = "cuda"
    q = torch.randn(b, 1, heads * head_dim, device=dev, dtype=dtype).view(b, heads, head_dim)
    k = torch.randn(b, 1, kv_heads * head_dim, device=dev, dtype=dtype).view(b, kv_heads, head_dim)
    v = torch.randn(b, kv_heads, head_dim, device=dev, dtype=dtype)
    cos, sin = torch.randn(b, head_dim, device=dev, dtype=dtype), torch.randn(b, head_dim, device=dev, dtype=dtype)
    positions = torch.tensor([0, 1, 63, 64, 2999], device=dev)
    keys = torch.full((b, kv_heads, length, head_dim), float("nan"), device=dev, dtype=dtype)
    values = keys.clone()
    q_rot = rope_append(q, k, v, cos, sin, positions, keys, values)
    assert torch.equal(q_rot, apply_rotary(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0])
    rows = torch.arange(b, device=dev)
    assert torch.equal(keys[rows, :, positions], apply_rotary(k[:, :, None], cos[:, None], sin[:, None])[:, :, 0])
    assert torch.equal(values[rows, :, positions], v)

    keys = torch.randn(b, kv_heads, length, head_dim, device=dev, dtype=dtype)
    values = torch.randn_like(keys)
    lengths = torch.tensor([1, 63, 64, 1000, 3000], device=dev)
    for splits in (None, 1, 7):
        attention = DecodeAttention(b, heads, kv_heads, head_dim, length, torch.device(dev), dtype, splits=splits)
        attention.out.fill_(float("nan"))
        got = attention(q_rot, keys, values, lengths)
        mask = torch.arange(length, device=dev)[None, :] < lengths[:, None]
        want = F.scaled_dot_product_attention(q_rot.double()[:, :, None], keys.double(), values.double(),
                                              attn_mask=mask[:, None, None], enable_gqa=True)[:, :, 0]
        assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-4)


def _models(layout):
    shape = replace(shapes.get_shape("smollm2-135m"), name="smollm2-6-layers", num_hidden_layers=6)
    teacher = shapes.varied_teacher(shape)
    model = attention_twin(teacher) if layout == "twin" else build_hybrid(teacher, ["mamba", "attention"] * 3)
    return model.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("layout", ["twin", "hybrid"])
@pytest.mark.parametrize("options", [{}, {"compile": False}, {"attention": "sdpa"}])
def test_graph_decoding_matches_generate_in_bf16_up_to_near_ties(layout, options):
    report = greedy_gate(_models(layout), batch=4, prompt_len=32, new_tokens=64, **options)
    assert report["graphs"] and report["distinct_tokens"] > 64
    assert report["equal"] or report["near_tie"], report


def test_graph_replay_gives_the_eager_steps_tokens():
    model = _models("hybrid")
    ids = torch.randint(3, 1000, (3, 20), device="cuda")
    graphed = DecodeEngine(model, 3, 60, compile=False).generate(ids, 40)
    eager = DecodeEngine(model, 3, 60, compile=False, graphs=False).generate(ids, 40)
    assert torch.equal(graphed, eager)


def test_bench_small_shape_on_the_gpu(tmp_path):
    result = runner.bench(shapes.get_shape("smollm2-135m"), mixer_layers=[15],
                          input_len=1, output_len=512, batch=8, mode="steady", steps=4, stock_steps=2,
                          json_path=tmp_path / "b.json", echo=False)
    rows = {(r["model"], r["path"]): r for r in result["rows"]}
    assert rows[("teacher", "engine")]["graphs"] and rows[("hybrid 15/30", "engine")]["tok_s"] > 0
    assert rows[("hybrid 15/30", "stock")]["ratio_vs_teacher"] > 0
    full = runner.bench(shapes.get_shape("smollm2-135m"), mixer_layers=15, input_len=16, output_len=32, batch=4,
                        mode="full", include_stock=False, echo=False)
    assert all(r["tok_s"] > 0 for r in full["rows"])
