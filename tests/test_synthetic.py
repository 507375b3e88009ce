"""Built-in tasks: answers re-derived independently from the problem text, determinism, splits."""

import ast
import hashlib
import json
import re

import pytest

from hybridize.data.synthetic import TASKS, synthesize, write_jsonl


def _question(row):
    return row["messages"][0]["content"]


def _solution(row):
    return row["messages"][1]["content"]


def _final_answer(row):
    last = _solution(row).splitlines()[-1]
    assert last.startswith("#### ")
    return last.removeprefix("#### ")


def _evaluate(expr: str) -> int:
    """Integer value of an expression of +, -, *, / (exact division only) over integers."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b}

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        assert isinstance(node, ast.BinOp), ast.dump(node)
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Div):
            assert right and left % right == 0, expr
            return left // right
        return ops[type(node.op)](left, right)

    return ev(ast.parse(expr, mode="eval").body)


# -- arithmetic ------------------------------------------------------------------------------

_STORY = [
    (re.compile(r"\w+ buys (\d+) more \w+\."), lambda x, k: x + int(k)),
    (re.compile(r"\w+ buys (\d+) packs with (\d+) \w+ in each pack\."),
     lambda x, k, m: x + int(k) * int(m)),
    (re.compile(r"\w+ gives (\d+) \w+ to \w+\."), lambda x, k: x - int(k)),
    (re.compile(r"\w+ loses (\d+) \w+\."), lambda x, k: x - int(k)),
    (re.compile(r"After a trade, \w+ has (twice|three times|four times) as many \w+ as before\."),
     lambda x, w: x * {"twice": 2, "three times": 3, "four times": 4}[w]),
    (re.compile(r"\w+ splits the \w+ into (\d+) equal piles and keeps one pile\."),
     lambda x, d: x // int(d) if x % int(d) == 0 else pytest.fail("uneven split")),
]


def _solve_story(question: str) -> tuple[int, int]:
    """(final count, number of changes) read from the story sentences alone."""
    sentences = re.split(r"(?<=[.?])\s+", question)
    start = re.fullmatch(r"(\w+) has (\d+) (\w+)\.", sentences[0])
    assert start, sentences[0]
    assert re.fullmatch(rf"How many {start[3]} does {start[1]} have now\?", sentences[-1])
    x = int(start[2])
    for sentence in sentences[1:-1]:
        for pattern, apply in _STORY:
            if m := pattern.fullmatch(sentence):
                x = apply(x, *m.groups())
                break
        else:
            pytest.fail(f"unrecognised story sentence: {sentence!r}")
        assert x >= 0
    return x, len(sentences) - 2


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_arithmetic_answer_matches_story_and_every_equation_line(steps):
    for row in synthesize("arithmetic", 120, seed=steps, steps=steps):
        story_answer, changes = _solve_story(_question(row))
        equations = re.findall(r": ([\d +\-*/]+) = (\d+)$", _solution(row), flags=re.M)
        assert changes == len(equations) == steps
        previous = int(re.search(r"starts with (\d+)", _solution(row))[1])
        for lhs, rhs in equations:
            assert int(lhs.split()[0]) == previous  # each step starts from the last result
            assert _evaluate(lhs) == int(rhs)
            previous = int(rhs)
        assert str(story_answer) == str(previous) == row["answer"] == _final_answer(row)


# -- variable tracking -----------------------------------------------------------------------

_LET = re.compile(r"Let ([A-Z]\d+) = ([A-Z]\d+|\d+)(?: ([+-]) (\d+))?\.")


def _run_assignments(question: str) -> tuple[dict, dict]:
    """Values of every ``Let`` statement evaluated in order, and each variable's source."""
    values, sources = {}, {}
    for name, operand, sign, k in _LET.findall(question):
        assert name not in values, f"{name} assigned twice"
        if operand.isdigit():
            base = int(operand)
        else:
            assert operand in values, f"{operand} used before it is assigned"
            base, sources[name] = values[operand], operand
        values[name] = base + (int(k) if sign == "+" else -int(k) if sign == "-" else 0)
        assert values[name] >= 0
    return values, sources


@pytest.mark.parametrize("chain,distractors,context_words",
                         [(1, 0, 0), (4, 20, 150), (12, 80, 600)])
def test_variable_tracking_answer_matches_evaluating_all_assignments(chain, distractors,
                                                                     context_words):
    rows = synthesize("variable_tracking", 120, seed=chain, chain=chain,
                      distractors=distractors, context_words=context_words)
    for row in rows:
        values, sources = _run_assignments(_question(row))
        assert len(values) == chain + 1 + distractors
        target = re.search(r"What is the value of ([A-Z]\d+)\?$", _question(row))[1]
        hops, var = 0, target
        while var in sources:
            var, hops = sources[var], hops + 1
        assert hops == chain
        assert str(values[target]) == row["answer"] == _final_answer(row)


def test_variable_tracking_solution_walks_back_one_line_per_hop():
    for row in synthesize("variable_tracking", 50, seed=3, chain=5):
        lines = _solution(row).splitlines()
        back = lines[1:lines.index("Substitute forward:")]
        assert len(back) == 6
        for line in back:
            assert f"Let {line}." in _question(row)
        values, _ = _run_assignments(_question(row))
        for line in lines[lines.index("Substitute forward:") + 1:-1]:
            name, *_, value = line.split(" = ")
            assert values[name] == int(value)


def test_context_words_lengthens_the_context():
    short = synthesize("variable_tracking", 20, seed=0, context_words=0)
    long = synthesize("variable_tracking", 20, seed=0, context_words=500)
    words = [sum(len(_question(r).split()) for r in rows) / 20 for rows in (short, long)]
    assert words[1] - words[0] >= 500


# -- multi-digit -----------------------------------------------------------------------------

@pytest.mark.parametrize("digits,op", [(1, "add"), (3, "add"), (9, "add"), (1, "mul"),
                                       (3, "mul"), (7, "mul"), (3, None)])
def test_multi_digit_answer_matches_python_integer_arithmetic(digits, op):
    rows = synthesize("multi_digit", 30 if digits == 1 else 80, seed=digits, digits=digits, op=op)
    for row in rows:
        m = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", _question(row))
        a, sign, b = int(m[1]), m[2], int(m[3])
        assert len(str(a)) == len(str(b)) == digits
        assert op is None or sign == {"add": "+", "mul": "*"}[op]
        assert str(a + b if sign == "+" else a * b) == row["answer"] == _final_answer(row)


def test_multi_digit_scratchpad_lines_are_each_true():
    for row in synthesize("multi_digit", 200, seed=5, digits=4):
        for line in _solution(row).splitlines():
            if m := re.fullmatch(r"column \d+: ([\d +]+) = (\d+), write (\d), carry (\d)", line):
                total = _evaluate(m[1])
                assert total == int(m[2]) and (total % 10, total // 10) == (int(m[3]), int(m[4]))
            elif m := re.fullmatch(r"(\d+ [*+] \d+) = (\d+)", line):
                assert _evaluate(m[1]) == int(m[2])
        if "+" in _question(row):
            assert _solution(row).splitlines()[-2].endswith(f": {row['answer']}")
        else:
            assert _solution(row).splitlines()[-2].endswith(f"= {row['answer']}")


def test_both_ops_appear_when_op_is_left_random():
    signs = {re.search(r"[+*]", _question(r))[0] for r in synthesize("multi_digit", 40, seed=0)}
    assert signs == {"+", "*"}


# -- rows, determinism, splits ---------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_rows_are_chat_messages_with_task_answer_and_text_hash_id(task):
    for row in synthesize(task, 20, seed=0):
        assert set(row) == {"id", "task", "answer", "messages"}
        assert row["task"] == task
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["id"] == hashlib.sha256(_question(row).encode()).hexdigest()[:16]


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_gives_identical_file(task, tmp_path):
    write_jsonl(synthesize(task, 50, seed=7), tmp_path / "a.jsonl")
    write_jsonl(synthesize(task, 50, seed=7), tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize("task", list(TASKS))
def test_different_seeds_give_different_problems(task):
    a = {r["id"] for r in synthesize(task, 50, seed=1)}
    b = {r["id"] for r in synthesize(task, 50, seed=2)}
    assert len(a & b) < 5


def test_passing_default_knobs_explicitly_changes_nothing():
    assert synthesize("arithmetic", 10, seed=0) == synthesize("arithmetic", 10, seed=0, steps=3)


@pytest.mark.parametrize("task", list(TASKS))
def test_train_and_test_never_share_a_problem(task):
    train = synthesize(task, 2000, seed=0, split="train")
    test = synthesize(task, 2000, seed=0, split="test") + synthesize(task, 500, seed=1,
                                                                    split="test")
    text_hash = lambda rows: {hashlib.sha256(_question(r).encode()).hexdigest() for r in rows}
    assert len({r["id"] for r in train}) == 2000
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not text_hash(train) & text_hash(test)


def test_small_problem_space_splits_disjointly_and_refuses_more_than_exist():
    train = synthesize("multi_digit", 30, seed=0, split="train", digits=1, op="add")
    test = synthesize("multi_digit", 30, seed=0, split="test", digits=1, op="add")
    assert not {_question(r) for r in train} & {_question(r) for r in test}
    with pytest.raises(ValueError, match="distinct"):
        synthesize("multi_digit", 81, seed=0, digits=1, op="add")


def _token_estimate(text: str) -> int:
    """Rough token count for a SmolLM2-style tokenizer: one per word, digit and symbol."""
    return len(re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text))


def test_default_problems_fit_a_small_model_context():
    for task in TASKS:
        for row in synthesize(task, 100, seed=0):
            assert _token_estimate(_question(row) + _solution(row)) < 1024
    contexts = [_token_estimate(_question(r)) for r in synthesize("variable_tracking", 100, 0)]
    assert 300 <= min(contexts) and max(contexts) <= 600


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(task="sudoku", n=5, seed=0), "valid tasks: arithmetic, variable_tracking, multi_digit"),
    (dict(task="arithmetic", n=0, seed=0), "positive integer"),
    (dict(task="arithmetic", n=-3, seed=0), "positive integer"),
    (dict(task="arithmetic", n=5, seed=0, split="dev"), "valid splits: train, test"),
    (dict(task="arithmetic", n=5, seed=0, digits=3), "valid knobs: steps"),
    (dict(task="arithmetic", n=5, seed=0, steps=0), "'steps' must be an integer from 1"),
    (dict(task="multi_digit", n=5, seed=0, op="div"), "'op' must be 'add', 'mul'"),
    (dict(task="variable_tracking", n=5, seed=0, chain="4"), "'chain' must be an integer"),
])
def test_bad_request_raises_value_error_naming_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        synthesize(**kwargs)


def test_failed_write_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl([{"ok": 1}, {"bad": object()}], path)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_written_file_round_trips_as_json_lines(tmp_path):
    rows = synthesize("arithmetic", 5, seed=0)
    write_jsonl(rows, tmp_path / "sub" / "rows.jsonl")
    lines = (tmp_path / "sub" / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
