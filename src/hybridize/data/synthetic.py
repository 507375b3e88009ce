"""Built-in verifiable reasoning tasks: the default training data and the default eval.

Every problem carries an answer the generator computed, so accuracy can be scored without a
judge, and a step-by-step solution ending in ``#### <answer>`` for distillation. Nothing is
downloaded. Generation is deterministic by (task, seed, split, knobs). Train and test never share
a problem: a problem belongs to the split its text hashes into, and any other problem is
rejected, so disjointness holds for every pair of seeds and knob settings.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import tempfile
from pathlib import Path

SPLITS = ("train", "test")

_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Ines", "Ravi", "Lena", "Kai", "Sara", "Tom")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "coins", "cards", "shells", "cookies",
          "books", "stamps")
_TIMES = {2: "twice", 3: "three times", 4: "four times"}
_FILLER = (
    "The morning shift started a little late.",
    "Someone left a blue umbrella by the door.",
    "The printer on the second floor was out of paper again.",
    "A delivery van waited outside for a while.",
    "The meeting notes were filed in the wrong folder.",
    "Rain was expected later in the afternoon.",
    "The coffee machine made a strange noise.",
    "A new plant was placed near the window.",
    "Nobody remembered who had booked the small room.",
    "The hallway lights flickered twice before settling.",
    "A stack of old reports sat on the corner desk.",
    "The team lunch was moved to the following week.",
    "A visitor asked for directions to the station.",
    "The heating came on earlier than usual.",
    "Two chairs were missing from the large room.",
    "The window cleaner arrived just after noon.",
    "A long email about parking went unanswered.",
    "The kitchen smelled faintly of toast.",
    "Somebody had rearranged the books on the shelf.",
    "The elevator stopped on every floor that day.",
    "A faint hum came from the server closet.",
    "The notice board was covered in old flyers.",
    "The courier forgot to ask for a signature.",
    "Outside, the wind picked up for a moment.",
)


def _int_knob(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"Knob {name!r} must be an integer from {low} to {high}, got {value!r}.")
    return value


def _arithmetic(rng: random.Random, steps: int = 3) -> tuple[str, str, int]:
    """A person's stock of items changes `steps` times; one equation line per change."""
    _int_knob("steps", steps, 1, 50)
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    x = rng.randint(5, 40)
    story = [f"{name} has {x} {item}."]
    work = [f"{name} starts with {x} {item}."]
    for _ in range(steps):
        kinds = ["buy", "packs"]
        if x >= 2:
            kinds += ["give", "lose"]
        if x <= 100:
            kinds.append("times")
        divisors = [d for d in range(2, 6) if x % d == 0]
        if divisors:
            kinds.append("split")
        kind = rng.choice(kinds)
        if kind == "buy":
            k = rng.randint(2, 30)
            story.append(f"{name} buys {k} more {item}.")
            work.append(f"Buys {k} more: {x} + {k} = {x + k}")
            x += k
        elif kind == "packs":
            k, m = rng.randint(2, 5), rng.randint(2, 10)
            story.append(f"{name} buys {k} packs with {m} {item} in each pack.")
            work.append(f"Buys {k} packs of {m}: {x} + {k} * {m} = {x + k * m}")
            x += k * m
        elif kind == "give":
            k = rng.randint(1, x - 1)
            story.append(f"{name} gives {k} {item} to {other}.")
            work.append(f"Gives {k} to {other}: {x} - {k} = {x - k}")
            x -= k
        elif kind == "lose":
            k = rng.randint(1, x - 1)
            story.append(f"{name} loses {k} {item}.")
            work.append(f"Loses {k}: {x} - {k} = {x - k}")
            x -= k
        elif kind == "times":
            m = rng.randint(2, 4)
            story.append(f"After a trade, {name} has {_TIMES[m]} as many {item} as before.")
            work.append(f"{_TIMES[m].capitalize()} as many: {x} * {m} = {x * m}")
            x *= m
        else:
            d = rng.choice(divisors)
            story.append(f"{name} splits the {item} into {d} equal piles and keeps one pile.")
            work.append(f"Keeps one of {d} equal piles: {x} / {d} = {x // d}")
            x //= d
    question = " ".join(story) + f" How many {item} does {name} have now?"
    return question, "\n".join(work), x


def _variable_names(rng: random.Random, count: int) -> list[str]:
    """Distinct names like ``K9``: a capital letter and a number from 1 to 99."""
    return [f"{chr(65 + i // 99)}{i % 99 + 1}" for i in rng.sample(range(26 * 99), count)]


def _expression(rng: random.Random, source: str, value: int) -> tuple[str, int]:
    """A copy of `source`, or `source` plus or minus a small constant, kept non-negative."""
    kind = rng.choice(("copy", "add", "sub") if value >= 1 else ("copy", "add"))
    if kind == "copy":
        return source, value
    k = rng.randint(1, 9) if kind == "add" else rng.randint(1, min(9, value))
    return (f"{source} + {k}", value + k) if kind == "add" else (f"{source} - {k}", value - k)


def _variable_tracking(rng: random.Random, chain: int = 4, distractors: int = 20,
                       context_words: int = 150) -> tuple[str, str, int]:
    """Follow `chain` hops of assignments back to a number, through distractors and filler.

    The chain's statements are scattered over a long context, so answering needs retrieval far
    back. Distractors are assignments too, some built on earlier variables (chain ones
    included), so the chain cannot be found by surface pattern; `context_words` of neutral
    filler sentences lengthen the context.
    """
    _int_knob("chain", chain, 1, 200)
    _int_knob("distractors", distractors, 0, 2000)
    _int_knob("context_words", context_words, 0, 100_000)
    names = _variable_names(rng, chain + 1 + distractors)
    chain_names, spare = names[: chain + 1], names[chain + 1:]
    chain_slots = set(rng.sample(range(len(names)), chain + 1))
    values: dict[str, int] = {}
    exprs: dict[str, str] = {}
    statements, hop = [], 0
    for slot in range(len(names)):
        if slot in chain_slots:
            var, source = chain_names[hop], chain_names[hop - 1] if hop else None
            hop += 1
        else:
            var = spare.pop()
            source = rng.choice(list(values)) if values and rng.random() < 0.6 else None
        if source is None:
            value = rng.randint(1, 99)
            exprs[var], values[var] = str(value), value
        else:
            exprs[var], values[var] = _expression(rng, source, values[source])
        statements.append(f"Let {var} = {exprs[var]}.")

    filler, words = [], 0
    while words < context_words:
        for sentence in rng.sample(_FILLER, len(_FILLER)):
            if words >= context_words:
                break
            filler.append(sentence)
            words += len(sentence.split())
    pieces = statements[:]
    for sentence in filler:
        pieces.insert(rng.randint(0, len(pieces)), sentence)

    target = chain_names[-1]
    question = (f"Read the notes and answer the question.\n\n{' '.join(pieces)}\n\n"
                f"What is the value of {target}?")
    back = [f"{var} = {exprs[var]}" for var in reversed(chain_names)]
    forward = []
    for prev, var in zip(chain_names, chain_names[1:]):
        change = exprs[var][len(prev):]
        forward.append(f"{var} = {values[prev]}{change}" + (f" = {values[var]}" if change else ""))
    solution = "\n".join([f"Follow {target} back to a number:", *back,
                          "Substitute forward:", *forward])
    return question, solution, values[target]


def _multi_digit(rng: random.Random, digits: int = 3,
                 op: str | None = None) -> tuple[str, str, int]:
    """Add or multiply two `digits`-digit numbers with a written scratchpad.

    Addition goes column by column with carries; multiplication writes one partial product per
    digit of the second operand, then adds them one at a time, so no line needs more than a
    single small step.
    """
    _int_knob("digits", digits, 1, 100)
    if op not in (None, "add", "mul"):
        raise ValueError(f"Knob 'op' must be 'add', 'mul' or None (random), got {op!r}.")
    op = op or rng.choice(("add", "mul"))
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    if op == "add":
        lines = ["Add column by column from the right, carrying the tens:"]
        carry, written = 0, []
        for col, (da, db) in enumerate(zip(reversed(str(a)), reversed(str(b))), start=1):
            total = int(da) + int(db) + carry
            terms = f"{da} + {db}" + (f" + {carry}" if carry else "")
            carry = total // 10
            lines.append(f"column {col}: {terms} = {total}, write {total % 10}, carry {carry}")
            written.append(str(total % 10))
        if carry:
            lines.append(f"The final carry {carry} becomes the leading digit.")
            written.append(str(carry))
        lines.append(f"Reading the written digits from the left: {''.join(reversed(written))}")
        return f"What is {a} + {b}?", "\n".join(lines), a + b
    lines = [f"Multiply {a} by each digit of {b}, from the right:"]
    partials = []
    for place, d in enumerate(reversed(str(b))):
        factor = int(d) * 10**place
        partials.append(a * factor)
        lines.append(f"{a} * {factor} = {a * factor}")
    lines.append("Add the partial products:")
    running = partials[0]
    for p in partials[1:]:
        lines.append(f"{running} + {p} = {running + p}")
        running += p
    return f"What is {a} * {b}?", "\n".join(lines), a * b


TASKS = {
    "arithmetic": _arithmetic,
    "variable_tracking": _variable_tracking,
    "multi_digit": _multi_digit,
}
"""Registry: task name -> generator ``(rng, **knobs) -> (question, solution, answer)``."""


def _split_of(digest: str) -> str:
    return SPLITS[int(digest[:8], 16) % len(SPLITS)]


def _resolve_knobs(task: str, n: int, seed: int, split: str, knobs: dict) -> dict:
    """Validate a request and return all of the task's knobs, defaults filled in."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {', '.join(TASKS)}.")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"The number of rows must be a positive integer, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"The seed must be an integer, got {seed!r}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
    defaults = {name: p.default for name, p in inspect.signature(TASKS[task]).parameters.items()
                if name != "rng"}
    for knob in knobs:
        if knob not in defaults:
            raise ValueError(f"Unknown knob {knob!r} for task {task!r}; valid knobs: "
                             f"{', '.join(defaults)}.")
    return {**defaults, **knobs}


def synthesize(task: str, n: int, seed: int, split: str = "train", **knobs) -> list[dict]:
    """`n` distinct problems of `task` in `split`, as chat rows with ``task``, ``answer``, ``id``.

    The id is a hash of the problem text; the split is decided by the same hash, so a problem
    drawn for the other split is skipped rather than emitted.
    """
    knobs = _resolve_knobs(task, n, seed, split, knobs)
    generate = TASKS[task]
    # Knobs (defaults included) are part of the seed: equal requests give equal rows.
    rng = random.Random(f"{task}|{split}|{seed}|{sorted(knobs.items())}")
    rows, seen = [], set()
    for _ in range(20 * n + 200):
        question, solution, answer = generate(rng, **knobs)
        digest = hashlib.sha256(question.encode("utf-8")).hexdigest()
        if _split_of(digest) != split or digest in seen:
            continue
        seen.add(digest)
        rows.append({
            "id": digest[:16],
            "task": task,
            "answer": str(answer),
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{solution}\n#### {answer}"},
            ],
        })
        if len(rows) == n:
            return rows
    raise ValueError(f"Only {len(rows)} distinct {task!r} problems were found for the {split} "
                     f"split with knobs {knobs}; ask for fewer rows or widen the knobs.")


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSON Lines via a temp file and ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
