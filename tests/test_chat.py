"""Tokenising rows: the loss mask covers exactly what the assistant says, and nothing is lost silently."""

import copy

import pytest

from hybridize.data.chat import tokenize_row, tokenize_rows

QUESTION = "What is 12 + 30?"
ANSWER = "12 + 30 = 42\n#### 42"
SINGLE = {"id": "single", "messages": [{"role": "user", "content": QUESTION},
                                       {"role": "assistant", "content": ANSWER}]}
MULTI = {"id": "multi", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": QUESTION},
                                     {"role": "assistant", "content": ANSWER},
                                     {"role": "user", "content": "And doubled?"},
                                     {"role": "assistant", "content": "84"}]}


def _spans(example):
    """Maximal runs of target tokens, as lists of ids."""
    spans, current = [], []
    for token, target in zip(example["input_ids"], example["loss_mask"]):
        if target:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def _turn(tokenizer, content):
    return tokenizer(content + "<|im_end|>", add_special_tokens=False)["input_ids"]


def test_loss_mask_covers_exactly_the_assistant_content_and_end_of_turn(tokenizer):
    example = tokenize_row(SINGLE, tokenizer)
    assert example["input_ids"] == tokenizer(tokenizer.apply_chat_template(SINGLE["messages"], tokenize=False),
                                             add_special_tokens=False)["input_ids"]
    assert _spans(example) == [_turn(tokenizer, ANSWER)]
    first = example["loss_mask"].index(True)
    assert tokenizer.decode(example["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_every_assistant_turn_of_a_multi_turn_row_is_a_target_and_nothing_else(tokenizer):
    assert _spans(tokenize_row(MULTI, tokenizer)) == [_turn(tokenizer, ANSWER), _turn(tokenizer, "84")]
    assert _spans(tokenize_row(MULTI, tokenizer, loss_on="last_assistant")) == [_turn(tokenizer, "84")]
    assert all(tokenize_row(MULTI, tokenizer, loss_on="all")["loss_mask"])


def test_text_rows_train_on_every_token_and_end_with_eos(tokenizer):
    example = tokenize_row({"text": "Plain text to continue."}, tokenizer)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][:-1]) == "Plain text to continue."
    assert all(example["loss_mask"])


def test_rows_too_long_are_truncated_or_dropped_and_counted(tokenizer):
    full = len(tokenize_row(SINGLE, tokenizer)["input_ids"])
    long_prompt = {"messages": [{"role": "user", "content": "Read this. " * 100},
                                {"role": "assistant", "content": "Done."}]}
    prompt_only = {"messages": SINGLE["messages"][:1]}
    rows = [SINGLE, long_prompt, {"text": "short"}, prompt_only]
    examples, report = tokenize_rows(rows, tokenizer, max_length=full - 2)
    assert [len(e["input_ids"]) for e in examples] == [full - 2, len(tokenize_row(rows[2], tokenizer)["input_ids"])]
    assert (report.rows, report.kept, report.truncated) == (4, 2, 1)
    assert report.dropped == {"no_target": 2}  # the answer lies past the cut; no assistant turn at all
    assert report.tokens == sum(len(e["input_ids"]) for e in examples)

    examples, report = tokenize_rows(rows, tokenizer, max_length=full - 2, overflow="drop")
    assert (report.kept, report.truncated, report.dropped) == (1, 0, {"too_long": 2, "no_target": 1})


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_row(tokenizer):
    counting = copy.deepcopy(tokenizer)
    counting.chat_template = ("{{ messages|length }} turns\n{% for m in messages %}<|im_start|>{{ m.role }}\n"
                              "{{ m.content }}<|im_end|>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=r"row 2 \(id 'multi'\).*message 2 \(assistant\)"):
        tokenize_rows([{"text": "fine"}, MULTI], counting)
    assert all(tokenize_row(MULTI, counting, loss_on="all")["loss_mask"])


def test_batched_tokenisation_of_many_rows_equals_one_row_at_a_time(tokenizer, monkeypatch):
    """tokenize_rows encodes each block's renderings in one batch; the examples must be exactly
    what tokenize_row gives row by row, for every loss_on, across block boundaries."""
    import random

    import hybridize.data.chat as chat

    rng = random.Random(7)
    rows = []
    for n in range(23):
        turns = [{"role": "system", "content": "Be brief."}] if n % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            turns += [{"role": "user", "content": f"What is {a} + {b}?"},
                      {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"}]
        rows.append({"id": f"r{n}", "messages": turns} if n != 5 else {"text": f"plain {n}"})
    batched = []
    encode_block = chat._encode_block
    monkeypatch.setattr(chat, "_encode_block", lambda *a: batched.append(encode_block(*a)) or batched[-1])
    monkeypatch.setattr(chat, "ENCODE_BLOCK", 4)
    for loss_on in ("assistant", "all", "last_assistant"):
        batched.clear()
        examples, report = tokenize_rows(rows, tokenizer, loss_on=loss_on)
        assert examples == [tokenize_row(row, tokenizer, loss_on) for row in rows]
        assert report.kept == len(rows) and len(batched) == 6 and all(batched)  # 23 rows in blocks of 4
