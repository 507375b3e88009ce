"""Evaluation: accuracy scoring never crashes on bad output, and teacher-forced metrics mean what they say."""

import copy
import json

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from hybridize.convert.surgery import build_hybrid
from hybridize.data.synthetic import synthesize
from hybridize.errors import UserError
from hybridize.evaluate.evaluator import (evaluate, format_table, generation_budgets, greedy_batch,
                                          prompt_messages, save_result, score_completions,
                                          teacher_forced_metrics)
from tiny import tiny_teacher


@pytest.fixture(scope="module")
def teacher(tokenizer):
    """A random tiny Llama whose vocabulary is the real tokenizer's, so real chat rows run through it."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows():
    return synthesize("arithmetic", 3, seed=0, split="test") + synthesize("multi_digit", 2, seed=0, split="test")


def test_model_evaluated_against_itself_has_zero_kl_and_full_agreement(teacher, tokenizer, rows):
    result = evaluate(teacher, tokenizer, rows, teacher=teacher, max_new_tokens=4, teacher_tokenizer=tokenizer)
    forced = result["teacher_forced"]
    assert forced["rows"] == len(rows) and forced["tokens"] > 100
    assert abs(forced["kl_teacher_model"]) <= 1e-6 and abs(forced["kl_model_teacher"]) <= 1e-6
    assert forced["agreement"] == 1.0
    assert forced["perplexity"] == pytest.approx(forced["teacher_perplexity"])
    assert result["teacher"]["accuracy"] == result["accuracy"]
    assert result["count"] == len(rows) and set(result["tasks"]) == {"arithmetic", "multi_digit"}


def test_perturbed_model_has_positive_kl_and_lower_agreement(teacher, tokenizer, rows):
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for param in student.model.layers[1].parameters():
            param.add_(torch.randn_like(param) * 0.5)
    forced = teacher_forced_metrics(student, teacher, tokenizer, rows)
    assert forced["kl_teacher_model"] > 1e-3 and forced["kl_model_teacher"] > 1e-3
    assert forced["agreement"] < 1.0
    assert forced["perplexity"] != pytest.approx(forced["teacher_perplexity"])


@pytest.mark.slow
def test_teacher_forced_metrics_do_not_depend_on_batching(teacher, tokenizer, rows):
    """Left padding and the kept-logits window must not change any number, for a hybrid too."""
    hybrid = build_hybrid(teacher, ["attention", "mamba"])
    rows = rows[2:]  # rows of different lengths, so the batch carries padding
    one = teacher_forced_metrics(hybrid, teacher, tokenizer, rows, batch_size=1)
    many = teacher_forced_metrics(hybrid, teacher, tokenizer, rows, batch_size=len(rows))
    for key in ("tokens", "kl_teacher_model", "kl_model_teacher", "perplexity", "agreement"):
        assert many[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "hybrid"])
def test_batched_greedy_decoding_matches_one_prompt_at_a_time(teacher, tokenizer, rows, family):
    """Left padding, and rows leaving the batch (and its cache) when they stop, change no token."""
    model = teacher if family == "llama" else build_hybrid(teacher, ["mamba", "attention"])
    prompts = [tokenizer(tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for r in rows[1:4]]
    free = greedy_batch(model, prompts, 12, stop_ids={-1}, pad_id=tokenizer.pad_token_id)
    stop = free[0][4]  # a token row 0 emits: rows stop at different steps, some never
    expected = [out[: out.index(stop)] if stop in out else out for out in free]
    assert len({len(e) for e in expected}) > 1
    assert greedy_batch(model, prompts, 12, {stop}, tokenizer.pad_token_id) == expected
    assert [greedy_batch(model, [p], 12, {stop}, tokenizer.pad_token_id)[0] for p in prompts] == expected


@pytest.mark.parametrize("completion", [
    "", "####", "#### ", "#### forty-two", "\\boxed{", "\\boxed{}", "#### 1/0", "#### 1e99999",
    "#### " + "9" * 5000, "#### 4 2", "#### 42 #### 41", "no answer here", None, 42,
])
def test_corrupted_answer_formats_score_wrong_without_crashing(completion):
    rows = [{"task": "arithmetic", "answer": "42", "messages": [{"role": "user", "content": "q"}]}]
    result = score_completions(rows, [completion])
    assert result["correct"] == 0 and result["accuracy"] == 0.0
    assert result["tasks"]["arithmetic"] == {"count": 1, "correct": 0, "accuracy": 0.0}


def test_scoring_counts_per_task_and_means_over_tasks():
    rows = [{"task": t, "answer": a, "messages": []} for t, a in
            [("a", "1"), ("a", "2"), ("a", "3"), ("b", "4")]]
    result = score_completions(rows, ["#### 1", "the answer is 2", "#### 3.0", "#### 5"])
    assert result["tasks"]["a"]["accuracy"] == 1.0 and result["tasks"]["b"]["accuracy"] == 0.0
    assert result["accuracy"] == 0.75 and result["task_mean_accuracy"] == 0.5
    assert [p["extracted"] for p in result["predictions"]] == ["1", "2", "3.0", "5"]


def test_generation_budget_follows_the_longest_reference_answer_per_task(tokenizer, rows):
    budgets = generation_budgets(tokenizer, rows, max_new_tokens=256)
    assert set(budgets) == {"arithmetic", "multi_digit"}
    assert all(32 < b <= 256 for b in budgets.values())
    assert generation_budgets(tokenizer, rows, max_new_tokens=20) == {"arithmetic": 20, "multi_digit": 20}


def test_vocabulary_mismatch_is_refused(teacher, tokenizer, rows):
    small = tiny_teacher("llama")  # 96-token vocabulary
    with pytest.raises(UserError, match="tokenizer has"):
        evaluate(small, tokenizer, rows, max_new_tokens=2)
    with pytest.raises(UserError, match="vocabulary"):
        evaluate(teacher, tokenizer, rows, teacher=small, max_new_tokens=2)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_token_for_test>"])
    with pytest.raises(UserError, match="tokenizers have different vocabularies"):
        evaluate(teacher, tokenizer, rows, teacher=teacher, teacher_tokenizer=other, max_new_tokens=2)


def test_empty_data_and_rows_without_answer_are_refused(teacher, tokenizer, rows):
    with pytest.raises(UserError, match="no rows"):
        evaluate(teacher, tokenizer, [], max_new_tokens=2)
    unanswered = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "answer"}]
    with pytest.raises(UserError, match="row 2 .*no 'answer'"):
        evaluate(teacher, tokenizer, unanswered, max_new_tokens=2)
    with pytest.raises(UserError, match="no chat 'messages'"):
        evaluate(teacher, tokenizer, [{"text": "plain", "answer": "1"}], max_new_tokens=2)


def test_result_is_saved_as_json_and_rendered_as_a_table(teacher, tokenizer, rows, tmp_path):
    result = evaluate(teacher, tokenizer, rows, teacher=teacher, max_new_tokens=2, limit=2)
    assert result["count"] == 2
    path = save_result(result, tmp_path / "nested" / "eval.json")
    assert json.loads(path.read_text())["teacher_forced"]["tokens"] == result["teacher_forced"]["tokens"]
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]
    console = Console(record=True, width=120)
    console.print(format_table(result))
    text = console.export_text()
    assert "accuracy arithmetic (2)" in text and "KL(teacher||model)" in text and "greedy agreement" in text


def test_a_model_left_in_train_mode_generates_as_in_eval_mode_and_keeps_its_mode(teacher, tokenizer, rows):
    """A student straight from the trainer is in train mode, where the hybrid keeps no cache; evaluation
    must not decode it token by token without context."""
    hybrid = build_hybrid(teacher, ["mamba", "attention"])
    expected = [p["completion"] for p in evaluate(hybrid.eval(), tokenizer, rows, max_new_tokens=12)["predictions"]]
    hybrid.train()
    got = evaluate(hybrid, tokenizer, rows, max_new_tokens=12)
    assert [p["completion"] for p in got["predictions"]] == expected
    assert hybrid.training
