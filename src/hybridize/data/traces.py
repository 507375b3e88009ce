"""Teacher traces: sample the teacher's own solutions and keep only those that verify.

Distilling on the teacher's traces rather than reference solutions trains the student on text
the teacher finds likely, so KL and SFT targets agree. Sampling is rejection sampling: a
completion is kept only when the answer extracted from it equals the prompt's reference answer,
and only when it ended its turn (a completion cut off at `max_new_tokens` would teach the
student not to stop). Every prompt therefore needs an ``answer``.

A prompt is a row's conversation up to and including its last user turn; anything after it
(typically a reference solution, as in the built-in synthetic tasks) is dropped, so a training
file of solved problems can be used as prompts unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from hybridize.data.io import BAD_JSON, DataError, normalize_row, raw_rows
from hybridize.data.synthetic import write_jsonl
from hybridize.evaluate.answers import extract_answer, is_correct
from hybridize.evaluate.generate import in_eval_mode, render_prompts

DEFAULT_TASK = "custom"


def _prompt(row, where: str) -> dict:
    if not isinstance(row, dict) or row.get("messages") is None:
        raise DataError(f"{where} has no 'messages'; a prompt row needs chat messages and an 'answer'.")
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise DataError(f"{where} has no usable 'answer' (a string or number); rejection sampling needs "
                        "the reference answer of every prompt.")
    normalised, reason = normalize_row({"messages": row["messages"]})
    if normalised is None:
        raise DataError(f"{where} has unusable 'messages' ({reason}); expected a list of "
                        "{'role': system|user|assistant, 'content': non-empty text}.")
    messages = normalised["messages"]
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        raise DataError(f"{where} has no user message to answer.")
    messages = messages[: users[-1] + 1]
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).hexdigest()
    return {
        "messages": messages,
        "answer": str(answer).strip(),
        "task": row.get("task") or DEFAULT_TASK,
        "id": str(row["id"]) if row.get("id") is not None else digest[:16],
    }


def prompts_from_rows(rows, source: str = "prompt rows") -> list[dict]:
    """Validated prompts ``{"messages", "answer", "task", "id"}``; DataError names the first bad row.

    Rows without a task are grouped as task "custom"; rows without an id get a hash of their
    prompt, so the id is stable across runs.
    """
    prompts = [_prompt(row, f"{source} row {number}") for number, row in enumerate(rows, start=1)]
    if not prompts:
        raise DataError(f"{source} holds no prompt.")
    return prompts


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts from a JSONL file, Parquet file or saved dataset folder; DataError names a bad row."""
    rows = raw_rows(path)
    for number, row in enumerate(rows, start=1):
        if row is BAD_JSON:
            raise DataError(f"{path} row {number} is not valid JSON.")
    return prompts_from_rows(rows, source=str(path))


def _eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an end-of-sequence "
                         "token, so a finished completion cannot be told from a cut-off one")
    return sorted(ids)


@torch.no_grad()
@in_eval_mode
def sample_completions(model, tokenizer, prompts, n_per_prompt=1, temperature=0.7, top_p=0.95,
                       max_new_tokens=512, batch_size=16, seed=0) -> list[list[str | None]]:
    """`n_per_prompt` completions per prompt (list of messages), None for each one cut off unfinished.

    Sampling is temperature plus nucleus (`top_p`) and nothing else: the top-k of 50 that
    transformers adds by default is switched off. Temperature 0 means greedy decoding (then only
    one completion per prompt makes sense). Batches hold up to `batch_size` sequences, left-padded
    (the tokenizer is set to pad on the left, with its end-of-sequence token if it has no pad
    token). `torch.manual_seed(seed + batch)` before each batch makes the samples a function of
    the inputs, the seed and the batch size.
    """
    if temperature < 0 or not 0 < top_p <= 1 or n_per_prompt < 1 or max_new_tokens < 1:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, n_per_prompt >= 1 and max_new_tokens >= 1")
    if temperature == 0 and n_per_prompt > 1:
        raise ValueError("greedy decoding (temperature 0) gives one completion per prompt; set n_per_prompt=1")
    eos = _eos_ids(model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos[0])
    tokenizer.padding_side = "left"
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0
                else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    device = next(model.parameters()).device
    texts = render_prompts(tokenizer, prompts)
    per_batch = max(1, batch_size // n_per_prompt)
    completions = []
    for batch_number, first in enumerate(range(0, len(texts), per_batch)):
        inputs = tokenizer(texts[first : first + per_batch], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(device)
        torch.manual_seed(seed + batch_number)
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=n_per_prompt,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **sampling)
        new = tokens[:, inputs["input_ids"].shape[1] :].tolist()
        for sequence in new:
            ends = [i for i, token in enumerate(sequence) if token in eos]
            completions.append(tokenizer.decode(sequence[: ends[0]], skip_special_tokens=True).strip()
                               if ends else None)
    return [completions[i : i + n_per_prompt] for i in range(0, len(completions), n_per_prompt)]


_COUNTS = ("prompts", "prompts_with_trace", "samples", "accepted", "unfinished", "no_answer", "wrong")


def _rates(counts: dict) -> dict:
    return {**counts, "acceptance_rate": counts["accepted"] / counts["samples"] if counts["samples"] else 0.0}


def select_verified(prompts: list[dict], completions: list[list[str | None]]) -> tuple[list[dict], dict]:
    """Trace rows for the completions whose answer verifies, and counts of what happened to each.

    `prompts` come from prompts_from_rows; `completions[i]` are the samples for prompt i, None
    for one that was cut off. Each kept sample becomes ``{"messages": prompt + assistant turn,
    "answer", "task", "id", "sample"}`` (id is the prompt's, sample its index). Stats count
    prompts, samples, accepted, unfinished, no_answer (nothing extractable), wrong, and prompts
    with at least one trace, in total and per task, with the acceptance rate (accepted/samples).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but completions for {len(completions)}")
    counts = defaultdict(lambda: dict.fromkeys(_COUNTS, 0))
    rows = []
    for prompt, samples in zip(prompts, completions):
        tally = counts[prompt["task"]]
        tally["prompts"] += 1
        kept_before = len(rows)
        for index, text in enumerate(samples):
            tally["samples"] += 1
            if text is None:
                tally["unfinished"] += 1
            elif extract_answer(text) is None:
                tally["no_answer"] += 1
            elif not is_correct(text, prompt["answer"]):
                tally["wrong"] += 1
            else:
                tally["accepted"] += 1
                rows.append({"messages": prompt["messages"] + [{"role": "assistant", "content": text}],
                             "answer": prompt["answer"], "task": prompt["task"], "id": prompt["id"],
                             "sample": index})
        tally["prompts_with_trace"] += len(rows) > kept_before
    total = {key: sum(c[key] for c in counts.values()) for key in _COUNTS}
    return rows, {**_rates(total), "per_task": {task: _rates(c) for task, c in sorted(counts.items())}}


def generate_traces(model, tokenizer, prompt_rows, n_per_prompt=1, temperature=0.7, top_p=0.95,
                    max_new_tokens=512, batch_size=16, seed=0) -> tuple[list[dict], dict]:
    """Rejection-sampled teacher traces for `prompt_rows` and their stats (see select_verified).

    Every row is validated before any sampling, so a bad file fails at once, not after hours.
    """
    prompts = prompts_from_rows(prompt_rows)
    completions = sample_completions(model, tokenizer, [p["messages"] for p in prompts], n_per_prompt,
                                     temperature, top_p, max_new_tokens, batch_size, seed)
    return select_verified(prompts, completions)


def generate_free_text(model, tokenizer, prompt_rows, n_per_prompt=1, temperature=0.7, top_p=0.95,
                       max_new_tokens=512, batch_size=16, seed=0) -> tuple[list[dict], dict]:
    """The teacher's free-form completions of `prompt_rows`, which need no answer: every sample that
    ended its turn becomes a row ``{"messages": prompt + assistant turn, "task", "id", "sample"}``.

    The counterpart of generate_traces for text that cannot be verified (e.g. `data.generic`
    prompts); stats count prompts, samples, kept and unfinished.
    """
    prompts = []
    for index, row in enumerate(prompt_rows):
        messages, reason = (normalize_row({"messages": row.get("messages")}) if isinstance(row, dict)
                            else (None, "not a mapping"))
        users = [i for i, m in enumerate(messages["messages"]) if m["role"] == "user"] if messages else []
        if not users:
            raise DataError(f"prompt row {index + 1} has no usable user message ({reason or 'no user turn'}).")
        prompts.append({"messages": messages["messages"][: users[-1] + 1], "task": row.get("task") or DEFAULT_TASK,
                        "id": str(row.get("id", index))})
    completions = sample_completions(model, tokenizer, [p["messages"] for p in prompts], n_per_prompt,
                                     temperature, top_p, max_new_tokens, batch_size, seed)
    rows = [{"messages": prompt["messages"] + [{"role": "assistant", "content": text}], "task": prompt["task"],
             "id": prompt["id"], "sample": index}
            for prompt, samples in zip(prompts, completions) for index, text in enumerate(samples) if text]
    samples = sum(len(samples) for samples in completions)
    return rows, {"prompts": len(prompts), "samples": samples, "kept": len(rows),
                  "unfinished": sum(text is None for samples in completions for text in samples)}


def write_traces(model, tokenizer, prompts_path, out, overwrite=False, **sampling) -> dict:
    """Read prompts from `prompts_path`, generate traces, write them to `out` (JSONL); returns stats.

    Refuses an existing `out` unless `overwrite`, and writes nothing when no sample verified
    (DataError with the counts), so a useless teacher setting never leaves an empty data file
    behind. `sampling` takes generate_traces' keyword arguments.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another path or pass overwrite=True.")
    rows, stats = generate_traces(model, tokenizer, read_prompts(prompts_path), **sampling)
    if not rows:
        raise DataError(f"none of the {stats['samples']} samples for {stats['prompts']} prompts in {prompts_path} "
                        f"verified ({stats['unfinished']} unfinished, {stats['no_answer']} without an answer, "
                        f"{stats['wrong']} wrong); nothing was written to {out}.")
    write_jsonl(rows, out)
    return stats
