"""Tiny random Llama-family teachers for tests (transformers' own model classes)."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "llama-linear-rope": lambda: LlamaForCausalLM(
        LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama3-rope-bias": lambda: LlamaForCausalLM(
        LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True)),
    "mistral-window": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=7)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)),
}


def tiny_tokenizer():
    """A 96-token word-level tokenizer with a chat template, matching the tiny teachers' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    words = [f"w{i}" for i in range(COMMON["vocab_size"] - len(specials) - 1)] + ["<unk>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
    )
    return tokenizer


@torch.no_grad()
def tiny_teacher(family="llama", seed=0):
    """A teacher whose every parameter (biases and norms too) is random, so no copy error hides."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.05)
    return model
