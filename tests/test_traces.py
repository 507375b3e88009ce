"""Teacher traces: only completions whose answer verifies become training rows, and the counts add up."""

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.surgery import build_hybrid
from hybridize.data import traces
from hybridize.data.generic import generic_prompts
from hybridize.data.io import DataError
from hybridize.data.synthetic import synthesize
from hybridize.data.traces import (generate_traces, prompts_from_rows, read_prompts, sample_completions,
                                   select_verified, write_traces)
from tiny import COMMON

COUNTS = ("accepted", "unfinished", "no_answer", "wrong")


@pytest.fixture(scope="module")
def clueless(tokenizer):
    """A tiny random hybrid over the real tokenizer's vocabulary: it can solve nothing."""
    teacher = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "eos_token_id": 2}))
    return build_hybrid(teacher, ["attention", "mamba", "identity", "mamba"]).eval()


def test_only_completions_with_the_right_answer_are_kept():
    arithmetic = synthesize("arithmetic", 2, seed=0)
    digits = synthesize("multi_digit", 1, seed=0)
    prompts = prompts_from_rows(arithmetic + digits)
    right = f"Counting step by step gives {arithmetic[0]['answer']}.\n#### {arithmetic[0]['answer']}"
    completions = [[right, f"#### {int(arithmetic[0]['answer']) + 1}", "no idea", None],
                   ["I refuse."],
                   [f"The product is {int(digits[0]['answer']):,}."]]
    rows, stats = select_verified(prompts, completions)

    assert [(row["id"], row["sample"]) for row in rows] == [(arithmetic[0]["id"], 0), (digits[0]["id"], 0)]
    assert rows[0]["messages"] == arithmetic[0]["messages"][:1] + [{"role": "assistant", "content": right}]
    assert rows[0]["answer"] == arithmetic[0]["answer"] and rows[0]["task"] == "arithmetic"
    assert {key: stats[key] for key in ("prompts", "samples", "prompts_with_trace", *COUNTS)} == {
        "prompts": 3, "samples": 6, "prompts_with_trace": 2,
        "accepted": 2, "unfinished": 1, "no_answer": 2, "wrong": 1}
    assert stats["acceptance_rate"] == pytest.approx(2 / 6)
    assert stats["per_task"]["arithmetic"]["acceptance_rate"] == pytest.approx(1 / 5)
    assert stats["per_task"]["multi_digit"]["accepted"] == 1


def test_prompt_rows_keep_the_conversation_up_to_the_last_user_turn():
    row = {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "2"}], "answer": 2}
    (prompt,) = prompts_from_rows([row])
    assert prompt["messages"] == row["messages"][:2]
    assert (prompt["answer"], prompt["task"]) == ("2", "custom")
    assert prompt["id"] == prompts_from_rows([row])[0]["id"]  # a stable hash when the row has no id


@pytest.mark.parametrize("row, complaint", [
    ({"messages": [{"role": "user", "content": "1+1?"}]}, "row 2 has no usable 'answer'"),
    ({"messages": [{"role": "user", "content": ""}], "answer": "2"}, "row 2 has unusable 'messages'"),
    ({"messages": [{"role": "system", "content": "Hi."}], "answer": "2"}, "row 2 has no user message"),
    ({"prompt": "1+1?", "answer": "2"}, "row 2 has no 'messages'"),
])
def test_unusable_prompt_rows_are_refused_naming_the_row(row, complaint):
    good = {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    with pytest.raises(DataError, match=complaint):
        prompts_from_rows([good, row])


def test_a_prompt_file_with_a_broken_line_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(synthesize("arithmetic", 1, seed=0)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"prompts.jsonl row 2 is not valid JSON"):
        read_prompts(path)


def test_a_model_that_solves_nothing_yields_no_trace_and_counts_every_sample(clueless, tokenizer):
    rows = synthesize("arithmetic", 3, seed=1)
    kwargs = dict(n_per_prompt=2, max_new_tokens=6, batch_size=4, seed=3)
    traces, stats = generate_traces(clueless, tokenizer, rows, **kwargs)
    assert traces == [] and stats["accepted"] == 0 and stats["acceptance_rate"] == 0
    assert (stats["prompts"], stats["samples"]) == (3, 6)
    assert sum(stats[key] for key in COUNTS) == stats["samples"]
    assert stats["per_task"]["arithmetic"]["samples"] == 6
    messages = [p["messages"] for p in prompts_from_rows(rows)]
    assert (sample_completions(clueless, tokenizer, messages, **kwargs)
            == sample_completions(clueless, tokenizer, messages, **kwargs))


def test_writing_traces_refuses_to_leave_an_empty_file(clueless, tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(synthesize("arithmetic", 1, seed=0)[0]) + "\n")
    out = tmp_path / "traces.jsonl"
    nothing = r"none of the 1 samples for 1 prompts .* verified \(1 unfinished.*nothing was written"
    with pytest.raises(DataError, match=nothing):
        write_traces(clueless, tokenizer, prompts, out, max_new_tokens=4)
    assert not out.exists()
    out.write_text("")
    with pytest.raises(DataError, match="already exists"):
        write_traces(clueless, tokenizer, prompts, out, max_new_tokens=4)


def test_free_text_keeps_every_finished_completion_without_needing_answers(monkeypatch):
    prompts = generic_prompts(3, seed=0)
    canned = [["A calm sea.", None], ["", "Bread rises because yeast makes gas."], [None, None]]
    monkeypatch.setattr(traces, "sample_completions", lambda model, tokenizer, messages, *args: canned)
    rows, stats = traces.generate_free_text(None, None, prompts, n_per_prompt=2)
    assert [(row["id"], row["sample"], row["messages"][-1]["content"]) for row in rows] == [
        (prompts[0]["id"], 0, "A calm sea."), (prompts[1]["id"], 1, "Bread rises because yeast makes gas.")]
    assert rows[0]["messages"][:-1] == prompts[0]["messages"] and rows[0]["task"] == "generic"
    assert stats == {"prompts": 3, "samples": 6, "kept": 2, "unfinished": 3}


def test_free_text_from_a_real_model_counts_every_sample(clueless, tokenizer):
    rows, stats = traces.generate_free_text(clueless, tokenizer, generic_prompts(2), n_per_prompt=2,
                                            max_new_tokens=4, batch_size=4)
    assert stats["samples"] == 4 and stats["kept"] == len(rows) and stats["kept"] + stats["unfinished"] <= 4


def test_free_text_refuses_a_row_without_a_user_turn():
    with pytest.raises(DataError, match="prompt row 2 has no usable user message"):
        traces.generate_free_text(None, None, [generic_prompts(1)[0], {"messages": []}])


def test_generic_prompts_are_distinct_deterministic_and_bounded():
    first = generic_prompts(200, seed=1)
    assert first == generic_prompts(200, seed=1) != generic_prompts(200, seed=2)
    assert len({row["messages"][0]["content"] for row in first}) == 200
    assert all(row["messages"][0]["role"] == "user" and len(row["messages"]) == 1 for row in first)
    with pytest.raises(ValueError, match="n must lie in 1.."):
        generic_prompts(10**6)
