"""The hybrid model: exact teacher where it keeps attention, consistent caching, padding and packing."""

import pytest
import torch
from tiny import FAMILIES, tiny_teacher

from hybridize.convert.surgery import build_hybrid


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_attention_hybrid_reproduces_teacher_logits(family):
    teacher = tiny_teacher(family)
    hybrid = build_hybrid(teacher, ["attention"] * 4)
    ids = torch.randint(0, 96, (2, 24))
    assert (logits(teacher, ids) - logits(hybrid, ids)).abs().max() <= 1e-4


def test_a_wrong_rope_is_detected_by_the_equivalence_check():
    teacher = tiny_teacher("llama3-rope-bias")
    hybrid = build_hybrid(teacher, ["attention"] * 4)
    hybrid.config.rope = {"rope_type": "default", "rope_theta": 500000.0}
    hybrid.model.rotary_emb.__init__(hybrid.config)
    ids = torch.randint(0, 96, (1, 24))
    assert (logits(teacher, ids) - logits(hybrid, ids)).abs().max() > 1e-3


MIXED = ["attention", "mamba", "identity", "mamba"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_incremental_decoding_gives_full_forward_logits_at_every_position(family):
    hybrid = build_hybrid(tiny_teacher(family), MIXED)
    ids = torch.randint(0, 96, (2, 19))
    full = logits(hybrid, ids, use_cache=False)
    with torch.no_grad():
        out = hybrid(ids[:, :7], use_cache=True)  # prefill, then one token at a time
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(7, 19):
            out = hybrid(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_chunked_prefill_continues_exactly():
    hybrid = build_hybrid(tiny_teacher(), MIXED)
    ids = torch.randint(0, 96, (1, 30))
    full = logits(hybrid, ids, use_cache=False)
    with torch.no_grad():
        first = hybrid(ids[:, :13], use_cache=True)
        second = hybrid(ids[:, 13:], past_key_values=first.past_key_values, use_cache=True)
    assert (torch.cat([first.logits, second.logits], 1) - full).abs().max() <= 1e-4


def test_left_padded_batch_generates_exactly_what_each_prompt_generates_alone():
    hybrid = build_hybrid(tiny_teacher(seed=3), MIXED)
    prompts = [torch.randint(1, 96, (n,)) for n in (5, 11, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = hybrid.generate(ids, attention_mask=mask, **settings)[:, width:]
    for i, p in enumerate(prompts):
        alone = hybrid.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **settings)
        assert torch.equal(batched[i], alone[0, len(p) :])


def test_padding_does_not_touch_the_recurrent_state():
    hybrid = build_hybrid(tiny_teacher(), MIXED)
    prompt = torch.randint(1, 96, (1, 6))
    padded = torch.cat([torch.full((1, 4), 7), prompt], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = hybrid(prompt, use_cache=True).past_key_values
        with_pad = hybrid(padded, attention_mask=mask, use_cache=True).past_key_values
    for layer in (1, 3):
        torch.testing.assert_close(alone.ssm_states[layer], with_pad.ssm_states[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.conv_states[layer], with_pad.conv_states[layer], atol=1e-6, rtol=1e-6)


def test_packed_sequence_with_position_resets_equals_documents_run_separately():
    hybrid = build_hybrid(tiny_teacher(), MIXED)
    docs = [torch.randint(0, 96, (1, n)) for n in (9, 6, 12)]
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    together = logits(hybrid, packed, position_ids=positions, use_cache=False)
    start = 0
    for doc in docs:
        alone = logits(hybrid, doc, use_cache=False)
        assert (together[:, start : start + doc.shape[1]] - alone).abs().max() <= 1e-4
        start += doc.shape[1]


def test_identity_layer_skips_the_whole_block():
    teacher = tiny_teacher()
    hybrid = build_hybrid(teacher, ["attention", "identity", "attention", "attention"])
    assert not list(hybrid.model.layers[1].parameters())
    ids = torch.randint(0, 96, (1, 10))
    hidden = hybrid.model.embed_tokens(ids)
    rotary = hybrid.model.rotary_emb(hidden, torch.arange(10)[None])
    assert torch.equal(hybrid.model.layers[1](hidden, rotary, None, None, None, None), hidden)


def test_gradients_reach_every_mixer_parameter():
    hybrid = build_hybrid(tiny_teacher(), MIXED).train()
    ids = torch.randint(0, 96, (2, 40))
    hybrid(ids, labels=ids, use_cache=False).loss.backward()
    mixer = hybrid.model.layers[1].mixer
    for name, param in mixer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kinds", [MIXED, ["mamba"] * 4], ids=["mixed", "all-mamba"])
def test_stock_generate_equals_greedy_full_forwards(kinds):
    """generate() feeds each step only its new token with the cache, whatever the layer kinds
    (transformers >= 5.24 decides that from the cache's per-layer `is_linear`)."""
    hybrid = build_hybrid(tiny_teacher(seed=5), kinds)
    ids = torch.randint(1, 96, (2, 7))
    generated = hybrid.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            step = hybrid(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, step], 1)
    assert torch.equal(generated, expected)


def test_decoding_writes_into_the_kv_cache_instead_of_copying_it_every_step():
    hybrid = build_hybrid(tiny_teacher(), MIXED)
    ids = torch.randint(1, 96, (2, 20))
    full = logits(hybrid, ids, use_cache=False)
    buffers, steps = set(), []
    with torch.no_grad():
        out = hybrid(ids[:, :4], use_cache=True)
        cache = out.past_key_values
        for t in range(4, 20):
            out = hybrid(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            buffers.add(cache.keys[0].data_ptr())
    assert (torch.cat(steps, 1) - full[:, 4:]).abs().max() <= 1e-4
    assert len(buffers) <= 3  # 4 tokens, then room for 8, 16, 32: grown by doubling, not per step
