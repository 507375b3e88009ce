"""Batched greedy or sampled generation from chat prompts, left-padded, through stock `generate`."""

import functools
import inspect

import torch


@functools.cache
def cache_keyword() -> str:
    """The keyword the installed transformers passes a cache to `forward` by, in `generate` too:
    `cache` from 5.24 on, `past_key_values` before. Read off a stock model class, since a hybrid's
    forward accepts both names and so says nothing about what `generate` will pass."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a model output carries, under either name."""
    return output["cache"] if "cache" in output else output.get("past_key_values")


def in_eval_mode(function):
    """Run `function(model, ...)` with the model in eval mode, then restore its mode.

    A model fresh from training is still in train mode, where the hybrid (like any model that
    skips its cache while training) keeps no cache: generation would then feed each new token
    without its context.
    """

    @functools.wraps(function)
    def wrapped(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return function(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return wrapped


def render_prompts(tokenizer, prompts):
    """Chat-template each prompt (a string or a list of messages) with the generation prompt appended."""
    texts = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


@torch.no_grad()
@in_eval_mode
def generate_texts(model, tokenizer, prompts, max_new_tokens=64, batch_size=16, do_sample=False,
                   temperature=1.0, top_p=1.0, num_return_sequences=1):
    """Completions (decoded, special tokens dropped) for each prompt, in order."""
    tokenizer.padding_side = "left"
    texts = render_prompts(tokenizer, prompts)
    outputs = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        tokens = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            num_return_sequences=num_return_sequences,
            **sampling,
        )
        new = tokens[:, batch["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs
