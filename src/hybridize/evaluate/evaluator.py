"""Evaluation of a model on verifiable chat rows: generation accuracy and agreement with a teacher.

Accuracy is what a user keeps or loses, but on a few hundred problems it is coarse and noisy.
Teacher-forced metrics on the reference solutions (KL both ways, perplexity, greedy agreement)
are dense: every assistant token counts, so they move before accuracy does and tell how far a
hybrid is from its teacher even where both answer wrong.

Generation is greedy and batched; each task gets its own token budget (1.5x its longest
reference solution plus a margin, capped by `max_new_tokens`), since the built-in answers are
short step lists and a fixed large budget would mostly pay for rambling that cannot change the
score. Rows are sorted by prompt length inside a task so batches carry little padding, and a
row leaves its batch as soon as it ends its turn.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from hybridize.convert.checkpoint import write_json_atomic
from hybridize.data.chat import tokenize_row
from hybridize.distill.losses import kl_per_token
from hybridize.errors import UserError
from hybridize.evaluate.answers import extract_answer, is_correct
from hybridize.evaluate.generate import cache_keyword, in_eval_mode, output_cache

DEFAULT_TASK = "default"


def prompt_messages(row) -> list[dict]:
    """The conversation up to the model's turn: the messages minus a final assistant turn."""
    messages = row["messages"]
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def score_completions(rows, completions) -> dict:
    """Accuracy overall and per task of `completions` (one per row); never raises on bad text."""
    tasks, predictions = {}, []
    for row, completion in zip(rows, completions, strict=True):
        task = row.get("task") or DEFAULT_TASK
        correct = is_correct(completion, row["answer"])
        stats = tasks.setdefault(task, {"count": 0, "correct": 0})
        stats["count"] += 1
        stats["correct"] += correct
        predictions.append({"id": row.get("id"), "task": task, "answer": str(row["answer"]),
                            "extracted": extract_answer(completion), "correct": correct,
                            "completion": completion})
    for stats in tasks.values():
        stats["accuracy"] = stats["correct"] / stats["count"]
    correct = sum(s["correct"] for s in tasks.values())
    return {
        "count": len(predictions),
        "correct": correct,
        "accuracy": correct / len(predictions) if predictions else 0.0,
        "task_mean_accuracy": sum(s["accuracy"] for s in tasks.values()) / len(tasks) if tasks else 0.0,
        "tasks": tasks,
        "predictions": predictions,
    }


def generation_budgets(tokenizer, rows, max_new_tokens) -> dict[str, int]:
    """Per task: new tokens allowed, 1.5x its longest reference answer + 16, at most `max_new_tokens`."""
    longest = {}
    for row in rows:
        task = row.get("task") or DEFAULT_TASK
        last = row["messages"][-1]
        length = (len(tokenizer(last["content"], add_special_tokens=False)["input_ids"])
                  if last["role"] == "assistant" else max_new_tokens)
        longest[task] = max(longest.get(task, 0), length)
    return {task: min(max_new_tokens, math.ceil(1.5 * length) + 16) for task, length in longest.items()}


def _stop_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS and whatever the model's generation config adds."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


@torch.inference_mode()
def greedy_batch(model, prompts, max_new_tokens, stop_ids, pad_id) -> list[list[int]]:
    """Greedy continuations of token-id prompts, one left-padded batch, finished rows dropped.

    Stock `generate` keeps every row of a batch until the last one stops; on a CPU, where a
    decode step costs about as much per row as the weights it streams, one rambling row then
    doubles the time of the batch. Here a row that emits a stop id leaves the batch and its
    cache (`batch_select_indices`, which both the transformers and the hybrid caches implement).
    The stop id itself is not returned.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, last = output_cache(out), positions[:, -1]
    keyword = cache_keyword()
    stops = torch.tensor(sorted(stop_ids), device=device)
    active = torch.arange(len(prompts), device=device)
    outputs = [[] for _ in prompts]
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        done = torch.isin(token, stops)
        for row, t, d in zip(active.tolist(), token.tolist(), done.tolist()):
            if not d:
                outputs[row].append(t)
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0 or step == max_new_tokens - 1:
            break
        if keep.numel() < active.numel():
            cache.batch_select_indices(keep)
            active, token, mask, last = active[keep], token[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None],
                    use_cache=True, **{keyword: cache})
    return outputs


@contextmanager
def _one_thread_per_op():
    """Run torch ops single-threaded for the duration: the parallelism is across batches instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generate_completions(model, tokenizer, rows, budgets, batch_size=16) -> list[str]:
    """Greedy chat completions in row order, task by task (each its own budget), shortest prompts first.

    A task's rows are split into equal batches of at most `batch_size`: a last batch of a few rows
    would cost nearly as many decode steps as a full one. On a CPU the batches run side by side in
    `torch.get_num_threads()` worker threads, each op single-threaded: intra-op threads meet at
    every op, so one core taken by another job stalls all of them (a 0.12 s decode step took 3.9 s
    on the shared 2-core machine, docs/evaluation.md), while independent batches never wait on
    each other.
    """
    prompts = [tokenizer(tokenizer.apply_chat_template(prompt_messages(row), tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for row in rows]
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)
    jobs = []
    for task, budget in budgets.items():
        order = sorted((i for i, row in enumerate(rows) if (row.get("task") or DEFAULT_TASK) == task),
                       key=lambda i: len(prompts[i]))
        size = math.ceil(len(order) / math.ceil(len(order) / batch_size))
        jobs += [(order[start : start + size], budget) for start in range(0, len(order), size)]
    jobs.sort(key=lambda job: -sum(len(prompts[i]) + job[1] for i in job[0]))  # longest first: even finish

    def run(job):
        chunk, budget = job
        return chunk, greedy_batch(model, [prompts[i] for i in chunk], budget, stop_ids, pad_id)

    completions = [None] * len(rows)
    workers = torch.get_num_threads() if next(model.parameters()).device.type == "cpu" else 1
    if workers > 1 and len(jobs) > 1:
        with _one_thread_per_op(), ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(job) for job in jobs]
    for chunk, new in results:
        for i, tokens in zip(chunk, new):
            completions[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return completions


@in_eval_mode
def generation_accuracy(model, tokenizer, rows, budgets, batch_size=16) -> dict:
    """`score_completions` of the model's greedy completions, with the seconds they took."""
    started = time.perf_counter()
    result = score_completions(rows, generate_completions(model, tokenizer, rows, budgets, batch_size))
    result["seconds"] = time.perf_counter() - started
    return result


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


@torch.inference_mode()
@in_eval_mode
def teacher_forced_metrics(model, teacher, tokenizer, rows, batch_size=8) -> dict:
    """Per-token means over the reference assistant tokens of every row that has one.

    The assistant tokens are those training takes its loss on (`data.chat.tokenize_row`: each
    turn's content and end-of-turn token). Position j-1 predicts token j, so a token is scored
    by the logits one step before it.
    Batches are left-padded so that the assistant tokens, which end a conversation, share the
    last columns, and only those columns are projected to the vocabulary (`logits_to_keep`).
    """
    started = time.perf_counter()
    encoded = []
    for number, row in enumerate(rows, start=1):
        try:
            example = tokenize_row(row, tokenizer, name=f"row {number}")
        except ValueError as error:
            raise UserError(str(error)) from None
        ids = example["input_ids"]
        targets = [j for j in range(1, len(ids)) if example["loss_mask"][j]]
        if targets:
            encoded.append((ids, targets))
    encoded.sort(key=lambda item: len(item[0]))
    sums = dict.fromkeys(("kl_teacher_model", "kl_model_teacher", "nll", "teacher_nll", "agree"), 0.0)
    tokens = 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        keep = max(len(ids) - targets[0] + 1 for ids, targets in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        rows_idx, cols_idx, target_ids = [], [], []
        for b, (ids, targets) in enumerate(batch):
            for j in targets:  # column of position j-1 among the last `keep` columns
                rows_idx.append(b)
                cols_idx.append(j - 1 - len(ids) + keep)
                target_ids.append(ids[j])
        index = (torch.tensor(rows_idx, device=device), torch.tensor(cols_idx, device=device))
        target = torch.tensor(target_ids, device=device)
        inputs = dict(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                      use_cache=False, logits_to_keep=keep)
        m = model(**inputs).logits[index].float()
        t = teacher(**inputs).logits[index].float()
        sums["kl_teacher_model"] += kl_per_token(t, m).sum().item()
        sums["kl_model_teacher"] += kl_per_token(m, t).sum().item()
        sums["nll"] += F.cross_entropy(m, target, reduction="sum").item()
        sums["teacher_nll"] += F.cross_entropy(t, target, reduction="sum").item()
        sums["agree"] += (m.argmax(-1) == t.argmax(-1)).sum().item()
        tokens += len(target_ids)
    if tokens == 0:
        return {"rows": 0, "tokens": 0, "seconds": time.perf_counter() - started}
    return {
        "rows": len(encoded),
        "tokens": tokens,
        "kl_teacher_model": sums["kl_teacher_model"] / tokens,
        "kl_model_teacher": sums["kl_model_teacher"] / tokens,
        "perplexity": math.exp(sums["nll"] / tokens),
        "teacher_perplexity": math.exp(sums["teacher_nll"] / tokens),
        "agreement": sums["agree"] / tokens,
        "seconds": time.perf_counter() - started,
    }


def check_inputs(model, tokenizer, rows, teacher=None, teacher_tokenizer=None) -> None:
    """Refuse what would give meaningless numbers or fail late: no rows, no answers, vocab mismatch."""
    if not rows:
        raise UserError("there are no rows to evaluate")
    for number, row in enumerate(rows, start=1):
        name = f"row {number}" + (f" (id {row['id']})" if row.get("id") else "")
        if not isinstance(row.get("messages"), list) or not row["messages"]:
            raise UserError(f"{name} has no chat 'messages'; evaluation needs a prompt to answer")
        if row.get("answer") is None or not str(row["answer"]).strip():
            raise UserError(f"{name} has no 'answer'; accuracy needs the reference answer of every row")
    vocab = _vocab_size(model)
    if len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only "
                        f"{vocab}; use the tokenizer saved with the model")
    if teacher is not None and _vocab_size(teacher) != vocab:
        raise UserError(f"the model's vocabulary ({vocab}) and the teacher's ({_vocab_size(teacher)}) differ; "
                        "KL needs a student distilled from this teacher")
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError("the model's and the teacher's tokenizers have different vocabularies; "
                        "KL needs a student distilled from this teacher")


@in_eval_mode
def evaluate(model, tokenizer, rows, teacher=None, max_new_tokens=256, batch_size=16, kl_batch_size=8,
             limit=None, teacher_tokenizer=None, teacher_accuracy=True) -> dict:
    """Accuracy of `model` on `rows`; with a teacher also teacher-forced KL/perplexity/agreement,
    the teacher's own accuracy (unless `teacher_accuracy=False`) and the fraction retained.

    Rows are chat rows with an `answer` (and optionally `task`, `id`), as `data.io.read_rows`
    and `data.synthetic.synthesize` give them.
    """
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be at least 1, got {limit}")
        rows = rows[:limit]
    check_inputs(model, tokenizer, rows, teacher, teacher_tokenizer)
    budgets = generation_budgets(tokenizer, rows, max_new_tokens)
    result = generation_accuracy(model, tokenizer, rows, budgets, batch_size)
    result["max_new_tokens"] = budgets
    if teacher is not None:
        result["teacher_forced"] = teacher_forced_metrics(model, teacher, tokenizer, rows, kl_batch_size)
        if teacher_accuracy:
            own = generation_accuracy(teacher, tokenizer, rows, budgets, batch_size)
            result["teacher"] = {k: own[k] for k in ("accuracy", "task_mean_accuracy", "tasks", "seconds")}
            if own["task_mean_accuracy"] > 0:
                result["retained"] = result["task_mean_accuracy"] / own["task_mean_accuracy"]
    return result


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(result) -> Table:
    """Accuracy per task, then teacher-forced metrics, model beside teacher where both exist."""
    teacher = result.get("teacher")
    table = Table(title=f"Evaluation on {result['count']} rows")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if teacher or result.get("teacher_forced"):
        table.add_column("teacher", justify="right")
    width = len(table.columns)

    def add(*cells, end_section=False):
        table.add_row(*cells[:width], end_section=end_section)

    for task, stats in result["tasks"].items():
        other = teacher["tasks"].get(task, {}).get("accuracy") if teacher else None
        add(f"accuracy {task} ({stats['count']})", _percent(stats["accuracy"]), _percent(other))
    add("accuracy, mean over tasks", _percent(result["task_mean_accuracy"]),
        _percent(teacher["task_mean_accuracy"]) if teacher else "-")
    add("accuracy, all rows", _percent(result["accuracy"]), _percent(teacher["accuracy"]) if teacher else "-",
        end_section=True)
    if "retained" in result:
        add("accuracy retained vs teacher", _percent(result["retained"]), "")
    forced = result.get("teacher_forced")
    if forced and forced["tokens"]:
        add(f"KL(teacher||model) per token ({forced['tokens']} tokens)", f"{forced['kl_teacher_model']:.4f}", "")
        add("KL(model||teacher) per token", f"{forced['kl_model_teacher']:.4f}", "")
        add("perplexity on reference answers", f"{forced['perplexity']:.3f}", f"{forced['teacher_perplexity']:.3f}")
        add("greedy agreement with teacher", _percent(forced["agreement"]), "")
    return table


def save_result(result, path) -> Path:
    """Write the result as JSON atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return path
