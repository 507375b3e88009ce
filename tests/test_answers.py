"""Answer extraction and scoring: the committed answer is found and compared by value."""

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from hybridize.data.synthetic import TASKS, synthesize
from hybridize.evaluate.answers import extract_answer, is_correct, normalize_number


@pytest.mark.parametrize("text,expected", [
    ("step 12\n#### 40\nchecking: 41\n#### 42", "42"),
    ("so the answer is #### 1,234.", "1,234."),
    ("#### 7 \\boxed{8} 9", "7 \\boxed{8} 9"),
    ("the answer is \\boxed{5}, no wait \\boxed{6}.", "6"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ {a}{ {b} } } and \\boxed{unclosed", "{a}{ {b} }"),
    ("\\boxed{}, then 9 apples", "9"),
    ("#### \n3 then 4", "4"),
    ("we owe -17 dollars", "-17"),
    ("total of 1,000 and then 2,500.75 left.", "2,500.75"),
    ("pi is about 3.14.", "3.14"),
    ("K9 has no numbers beyond the name", None),
    ("no numbers at all", None),
    ("", None),
])
def test_extract_answer_prefers_hashes_then_boxed_then_last_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("3.0", "3"), ("3", "3"), ("-0", "0"), ("1,234", "1234"), ("$1,234.", "1234"),
    ("\\$5", "5"), ("+8", "8"), ("0.5", "1/2"), ("-2.50", "-5/2"), ("6/4", "3/2"),
    ("abc", None), ("1/0", None), ("1e5", None), ("", None), ("9" * 5000, None),
])
def test_normalize_number_canonicalises_values(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("prediction,reference", [
    ("#### 42", "42"),
    ("#### 42.0", "42"),
    ("#### $1,234", "1234"),
    ("The answer is \\boxed{-7}.", "-7"),
    ("after all that I get 12.50", "12.5"),
    ("#### Paris", "paris"),
])
def test_equal_values_score_correct(prediction, reference):
    assert is_correct(prediction, reference)


@pytest.mark.parametrize("prediction,reference", [
    ("#### 41", "42"),
    ("#### 42 apples", "43"),
    ("42 was tempting but \\boxed{43}", "42"),
    ("#### 4.2", "42"),
])
def test_different_values_score_wrong(prediction, reference):
    assert not is_correct(prediction, reference)


@pytest.mark.parametrize("garbage", [
    None, 42, b"#### 42", ["#### 42"], "", "\x00\xff\ufffd", "\\boxed{" * 500, "#" * 10_000,
    "#### " + "9" * 6000, "}}}{{{\\boxed{\\frac{", "#### \\frac{1}{0}",
])
def test_garbage_scores_wrong_without_raising(garbage):
    assert is_correct(garbage, "42") is False


def test_missing_reference_scores_wrong():
    assert is_correct("#### 42", None) is False


def test_scoring_works_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes the import raise ImportError
    assert is_correct("#### 1,000", "1000")
    assert not is_correct("#### \\frac{1}{2}", "0.5")


def test_math_verify_when_installed_accepts_symbolic_equivalents():
    pytest.importorskip("math_verify")
    assert is_correct("#### \\frac{1}{2}", "0.5")
    assert not is_correct("#### \\frac{1}{3}", "0.5")


def test_math_verify_when_installed_also_works_off_the_main_thread():
    pytest.importorskip("math_verify")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(is_correct, "#### \\frac{1}{2}", "0.5").result()


@pytest.mark.parametrize("task", list(TASKS))
def test_reference_solutions_of_builtin_tasks_score_correct(task):
    for row in synthesize(task, 50, seed=0):
        assert is_correct(row["messages"][1]["content"], row["answer"])
        assert extract_answer(row["messages"][1]["content"]) == row["answer"]
