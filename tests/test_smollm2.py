"""The real built-in teacher, SmolLM2-135M-Instruct, through conversion and generation."""

import pytest
import torch

from hybridize.convert.surgery import build_hybrid
from hybridize.convert.teacher import load_teacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_teacher("smollm2-135m")


@pytest.fixture(scope="module")
def chat_ids(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_all_attention_hybrid_reproduces_smollm2_logits_on_a_chat_prompt(smollm2, chat_ids):
    teacher, _ = smollm2
    hybrid = build_hybrid(teacher, ["attention"] * 30)
    with torch.no_grad():
        assert (teacher(chat_ids).logits - hybrid(chat_ids).logits).abs().max() <= 1e-4


def test_smollm2_hybrid_with_half_the_layers_converted_generates_with_cache_consistently(smollm2, chat_ids):
    teacher, _ = smollm2
    hybrid = build_hybrid(teacher, ["attention", "mamba"] * 15)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = hybrid.generate(chat_ids, **settings)
    without_cache = hybrid.generate(chat_ids, use_cache=False, **settings)
    assert torch.equal(with_cache, without_cache)
