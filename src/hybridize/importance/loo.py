"""Leave-one-out layer importance: how much the output moves when one layer is removed.

For every layer i the model is run with layer i replaced by the identity (scope `block`, as in
Apriel-H1) or with only its mixer removed (scope `mixer`, MLP kept), and scored against the
unablated model on held-out data: teacher-forced KL(reference || ablated) per masked token, or the
ablated model's cross-entropy on the labels. Lower score = less important = converted first.

Layers before i are unaffected by the ablation, so each batch runs the reference model once,
keeps the hidden state entering every layer, and restarts each ablated pass at layer i: about half
the compute of 1 + L full forwards.
"""

import time

import torch

from hybridize.modeling.modeling_hybrid import HybridForCausalLM, _attention_mask

SCOPES = ("block", "mixer")
METRICS = ("kl", "ce")


def _run_layers(model, hidden, start, context, mask, skip=None, scope="block"):
    """Layers start.. of a HybridForCausalLM, layer `skip` ablated; fp32 logits of the masked tokens only
    (the vocabulary projection is a large share of the cost and only scored tokens need it)."""
    layers = model.model.layers
    for index in range(start, len(layers)):
        layer = layers[index]
        if index == skip:
            if scope == "mixer" and layer.mixer_type != "identity":
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            continue
        hidden = layer(hidden, *context)
    return model.lm_head(model.model.norm(hidden[mask])).float()


def _score(reference_logprobs, logits, labels, metric):
    """Summed score over the masked tokens (logits and labels already restricted to them)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if metric == "kl":
        per_token = (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1)
    else:
        per_token = -logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return per_token.sum().item()


@torch.no_grad()
def leave_one_out(model: HybridForCausalLM, batches, scope="block", metric="kl", layers=None, progress=None):
    """Scores per layer (mean per masked token) for `batches` of dicts with input_ids, position_ids,
    labels (target of each position, -100 for none) and loss_mask. Returns the result dict."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    model.eval()
    num_layers = model.config.num_hidden_layers
    candidates = [i for i in (layers if layers is not None else range(num_layers))
                  if model.config.mixer_types[i] != "identity"]
    totals = {i: 0.0 for i in candidates}
    reference_total, tokens = 0.0, 0
    started = time.time()
    device = model.model.embed_tokens.weight.device
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        ids, positions = batch["input_ids"], batch["position_ids"]
        mask = batch["loss_mask"].bool() & (batch["labels"] >= 0)
        hidden = model.model.embed_tokens(ids)
        context = (
            model.model.rotary_emb(hidden, positions),
            _attention_mask(None, positions, 0, ids.shape[1], model.config.sliding_window),
            None,
            (positions == 0) if bool((positions[:, 1:] == 0).any()) else None,
            None,
        )
        entering = []
        for layer in model.model.layers:
            entering.append(hidden)
            hidden = layer(hidden, *context)
        labels = batch["labels"][mask]
        reference = model.lm_head(model.model.norm(hidden[mask])).float()
        reference_logprobs = torch.log_softmax(reference, dim=-1)
        reference_total += _score(reference_logprobs, reference, labels, "ce")
        for index in candidates:
            logits = _run_layers(model, entering[index], index, context, mask, skip=index, scope=scope)
            totals[index] += _score(reference_logprobs, logits, labels, metric)
        tokens += int(mask.sum())
        if progress is not None:
            progress(tokens)
    if tokens == 0:
        raise ValueError("the held-out data has no masked-in tokens to score")
    scores = {i: totals[i] / tokens for i in candidates}
    return {
        "method": "loo",
        "scope": scope,
        "metric": metric,
        "scores": {str(i): s for i, s in scores.items()},
        "ranking": sorted(candidates, key=lambda i: scores[i]),
        "reference_ce": reference_total / tokens,
        "tokens": tokens,
        "seconds": round(time.time() - started, 1),
    }
