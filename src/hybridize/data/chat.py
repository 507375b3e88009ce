"""Tokenising rows for training: token ids plus a mask of the tokens the loss is taken on.

``messages`` rows are rendered by the tokenizer's own chat template, so the student is trained
on exactly the format the teacher was. Which tokens belong to the assistant is found by
rendering the conversation prefix by prefix and comparing token ids: the tokens that rendering
``messages[:i+1]`` adds to ``messages[:i]`` plus the generation prompt are assistant turn i.
That only holds when the template renders every prefix as a prefix of the whole; templates that
rewrite earlier turns (e.g. drop old reasoning) break it, and such rows are refused rather than
trained with a wrong mask. Templates differ in what follows a turn: the mask ends at the turn's
last special token (the end-of-turn token the model must learn to emit), so template glue after
it, such as a newline, is not trained.

``loss_mask[j]`` says whether token j is a training target, i.e. whether the prediction of
token j from tokens < j is scored; packing turns that into per-position labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

LOSS_ON = ("assistant", "all", "last_assistant")
OVERFLOW = ("truncate", "drop")
ENCODE_BLOCK = 1024  # rows whose renderings are tokenised in one batch


@dataclass
class TokenizeReport:
    """How many rows became training examples, and why the others did not."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        text = (f"kept {self.kept} of {self.rows} rows ({self.tokens} tokens, {self.target_tokens} "
                f"trained), {self.truncated} truncated")
        dropped = ", ".join(f"{why} {count}" for why, count in sorted(self.dropped.items()))
        return f"{text}; dropped: {dropped}" if dropped else text


def _describe(row, number: int | None = None) -> str:
    """How an error names a row: its number in the input and its id, whichever are known."""
    name = "row" if number is None else f"row {number}"
    if isinstance(row, dict) and row.get("id") is not None:
        name += f" (id {row['id']!r})"
    return name


def _special_ids(tokenizer) -> set[int]:
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return special


def _template(tokenizer, messages, generation_prompt, name) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises whatever the template author chose
        raise ValueError(f"{name}: the chat template failed on it: {error}") from None


def _render(tokenizer, messages, generation_prompt, name, encoded=None) -> list[int]:
    """Token ids of the templated `messages`; `encoded` maps texts already tokenised to their ids."""
    text = _template(tokenizer, messages, generation_prompt, name)
    if encoded is not None and text in encoded:
        return encoded[text]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _texts_to_encode(row, loss_on) -> list[tuple[list, bool]]:
    """(messages, generation prompt) of every rendering `tokenize_row` makes of a chat row."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list):
        return []
    needed = [(messages, False)]
    if loss_on != "all":
        for i, message in enumerate(messages):
            if isinstance(message, dict) and message.get("role") == "assistant":
                needed += [(messages[:i], True), (messages[: i + 1], False)]
    return needed


def _encode_block(rows, tokenizer, loss_on) -> dict[str, list[int]]:
    """Every text the rows' tokenisation renders, tokenised in one batch (the fast tokenizers encode a
    batch on all cores; one call per text would use one). Rows whose template fails are skipped here
    and raise, naming the row, when tokenised."""
    if tokenizer.chat_template is None:
        return {}
    texts = set()
    for row in rows:
        try:
            texts.update(_template(tokenizer, messages, prompt, "") for messages, prompt in _texts_to_encode(row, loss_on))
        except ValueError:
            continue
    texts = sorted(texts)
    return dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}


def _assistant_spans(messages, tokenizer, full, name, encoded=None) -> list[tuple[int, int]]:
    """[start, end) token spans of each assistant turn's content and end-of-turn token in `full`."""
    special = _special_ids(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, name, encoded)
        through = _render(tokenizer, messages[: i + 1], False, name, encoded)
        if through[: len(before)] != before or full[: len(through)] != through:
            raise ValueError(
                f"{name}: the tokenizer's chat template does not render message {i} (assistant) as an "
                "extension of the conversation before it, so its tokens cannot be located; use a "
                "template that renders prefixes consistently, or train this data with loss_on='all'."
            )
        end = len(through)
        for j in range(len(through) - 1, len(before) - 1, -1):
            if through[j] in special:
                end = j + 1
                break
        spans.append((len(before), end))
    return spans


def _truncate(example: dict, max_length: int | None) -> dict:
    if max_length is None:
        return example
    return {key: value[:max_length] for key, value in example.items()}


def tokenize_row(row: dict, tokenizer, loss_on: str = "assistant", max_length: int | None = None,
                 name: str | None = None, encoded: dict | None = None) -> dict:
    """``{"input_ids": [...], "loss_mask": [...]}`` of one normalised row, truncated to `max_length`.

    ``messages`` rows are chat-templated; `loss_on` picks the targets: every assistant turn
    (content and end-of-turn token, never the role header), only the last one, or every token.
    ``text`` rows are tokenised as they are (with the tokenizer's own special tokens) plus the
    end-of-sequence token, and every token is a target whatever `loss_on` says, since plain text
    has no roles. Raises ValueError naming the row (as `name`, else by its id) when it cannot be
    tokenised faithfully. `encoded` (text -> ids) supplies renderings tokenised beforehand.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    name = name or _describe(row)
    if isinstance(row, dict) and "messages" not in row and isinstance(row.get("text"), str):
        ids = tokenizer(row["text"])["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return _truncate({"input_ids": ids, "loss_mask": [True] * len(ids)}, max_length)
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError(f"{name} has neither 'messages' nor 'text'; read data with hybridize.data.io.read_rows")
    if tokenizer.chat_template is None:
        raise ValueError(f"{name} is a chat row but the tokenizer has no chat template; use an instruct "
                         "model's tokenizer, or text rows")
    messages = row["messages"]
    ids = _render(tokenizer, messages, False, name, encoded)
    if loss_on == "all":
        mask = [True] * len(ids)
    else:
        spans = _assistant_spans(messages, tokenizer, ids, name, encoded)
        if loss_on == "last_assistant":
            spans = spans[-1:]
        mask = [False] * len(ids)
        for start, end in spans:
            mask[start:end] = [True] * (end - start)
    return _truncate({"input_ids": ids, "loss_mask": mask}, max_length)


def tokenize_rows(rows, tokenizer, loss_on: str = "assistant", max_length: int | None = None,
                  overflow: str = "truncate") -> tuple[list[dict], TokenizeReport]:
    """Training examples of `rows` and a report of what was truncated or dropped.

    A row longer than `max_length` is cut to its first `max_length` tokens (``overflow="truncate"``)
    or left out (``"drop"``). A row with no target left (no assistant turn, or every target
    truncated away) is left out as ``no_target``: it would cost compute and train nothing.
    Rows that cannot be tokenised faithfully raise ValueError naming the row.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    rows = rows if isinstance(rows, list) else list(rows)
    examples, dropped, report = [], Counter(), TokenizeReport()
    encoded = {}
    for number, row in enumerate(rows, start=1):
        if (number - 1) % ENCODE_BLOCK == 0:  # bounded memory: the texts of one block at a time
            encoded = _encode_block(rows[number - 1: number - 1 + ENCODE_BLOCK], tokenizer, loss_on)
        report.rows += 1
        example = tokenize_row(row, tokenizer, loss_on, name=_describe(row, number), encoded=encoded)
        too_long = max_length is not None and len(example["input_ids"]) > max_length
        if too_long and overflow == "drop":
            dropped["too_long"] += 1
            continue
        example = _truncate(example, max_length)
        if not any(example["loss_mask"][1:]):  # token 0 has nothing before it to predict it from
            dropped["no_target"] += 1
            continue
        report.truncated += too_long
        examples.append(example)
        report.tokens += len(example["input_ids"])
        report.target_tokens += sum(example["loss_mask"][1:])
    report.kept = len(examples)
    report.dropped = dict(dropped)
    return examples, report
