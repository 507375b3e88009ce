"""Answer extraction and checking for generation accuracy on verifiable tasks.

Model output is free text, so scoring first finds the answer the model committed to (the
``#### x`` convention of the built-in tasks, then LaTeX ``\\boxed{x}``, then the last number),
and then compares values rather than spellings: ``1,234.0`` and ``1234`` are the same answer.
``math_verify`` is used when installed, for symbolic answers such as ``\\frac{1}{2}``. Output a
model produces can be anything, so nothing here raises on bad text: it scores False.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

_HASHES = re.compile(r"####[ \t]*(\S[^\n]*)")
_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The answer a model committed to, or None when the text holds none.

    Tried in order: the last non-empty ``#### x`` line, the last balanced ``\\boxed{x}``, the
    last number in the text.
    """
    if not isinstance(text, str):
        return None
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1] if numbers else None


def normalize_number(text: str) -> str | None:
    """A canonical spelling of the number in `text`, or None if `text` is not a number.

    Commas, ``$`` and a trailing ``.`` are dropped; integers come back as plain digits
    ("3.0" -> "3"), other values as an exact fraction ("0.5" -> "1/2").
    """
    if not isinstance(text, str):
        return None
    s = text.strip().replace(",", "").replace("\\$", "").replace("$", "").strip().rstrip(".")
    s = s.removeprefix("+")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):  # e.g. "1/0", or more digits than int() accepts
        return None
    return str(value.numerator) if value.denominator == 1 else str(value)


def _math_verify_equal(predicted: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # math_verify's timeouts use signal.alarm, which only works in the main thread; elsewhere
    # they would make every call fail, so they are switched off there.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=limit)
        return bool(verify(gold, parse(f"${predicted}$", parsing_timeout=limit),
                           timeout_seconds=limit))
    except Exception:  # math_verify/sympy can fail in many ways on garbage; that is a wrong answer
        return False


def is_correct(prediction_text: str, reference_answer: str) -> bool:
    """Whether the answer extracted from `prediction_text` equals `reference_answer`.

    Two plain numbers compare exactly by value; anything else by text (case and spacing
    ignored) and, when ``math_verify`` is installed, symbolically.
    """
    predicted = extract_answer(prediction_text)
    if predicted is None or reference_answer is None:
        return False
    reference = str(reference_answer).strip()
    pred_num, ref_num = normalize_number(predicted), normalize_number(reference)
    if pred_num is not None and ref_num is not None:
        return pred_num == ref_num
    if " ".join(predicted.split()).casefold() == " ".join(reference.split()).casefold():
        return True
    return _math_verify_equal(predicted, reference)
