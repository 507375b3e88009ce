"""Reading user training data into one row shape, counting what had to be skipped.

Users bring JSONL, Parquet or a saved Hugging Face dataset, in chat ``messages`` form,
``prompt``+``completion`` form, or plain ``text``. Everything downstream (chat template, loss
mask, packing) sees either ``{"messages": [...]}`` or ``{"text": ...}``. A row that does not fit
is skipped and counted by reason, so a bad export shows up in the report instead of quietly
training on garbage; a file with no usable row at all is an error.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hybridize.errors import UserError

ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


@dataclass
class ReadReport:
    """How many rows a file had, how many were kept, and why the others were skipped."""

    total: int = 0
    kept: int = 0
    malformed: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{why} {count}" for why, count in sorted(self.malformed.items()))
        kept = f"kept {self.kept} of {self.total} rows"
        return f"{kept}; skipped: {skipped}" if skipped else kept


def _messages(value) -> tuple[list[dict] | None, str | None]:
    """Validated copy of a chat message list, or the reason it is unusable."""
    if not isinstance(value, list) or not value:
        return None, "bad_messages"
    out = []
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return None, "bad_messages"
        if message["role"] not in ROLES:
            return None, "bad_role"
        if not isinstance(message["content"], str):
            return None, "bad_content"
        if not message["content"].strip():
            return None, "empty_content"
        out.append({"role": message["role"], "content": message["content"]})
    return out, None


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


METADATA_FIELDS = ("answer", "task", "id")


def normalize_row(row) -> tuple[dict | None, str | None]:
    """``({"messages": [...]} or {"text": ...}, None)`` for a usable row, else ``(None, reason)``.

    The fields `answer`, `task` and `id`, when present, are carried along: evaluation and
    trace generation verify against `answer`.

    Forms are tried in order: ``messages``; ``prompt``+``completion`` (strings become one
    user and one assistant turn, message lists are joined); ``text``. A missing field and a
    null one are the same, since Parquet and datasets columns fill absent values with null.
    """
    if not isinstance(row, dict):
        return None, "not_an_object"
    normalized, reason = _normalize_content(row)
    if normalized is not None:
        normalized.update({k: str(row[k]) for k in METADATA_FIELDS if row.get(k) is not None})
    return normalized, reason


def _normalize_content(row: dict) -> tuple[dict | None, str | None]:
    if row.get("messages") is not None:
        messages, reason = _messages(row["messages"])
        return ({"messages": messages}, None) if messages else (None, reason)
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None or completion is not None:
        if completion is None:
            return None, "missing_completion"
        if prompt is None:
            return None, "missing_prompt"
        if isinstance(prompt, list) and isinstance(completion, list):
            messages, reason = _messages(prompt + completion)
            return ({"messages": messages}, None) if messages else (None, reason)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None, "bad_content"
        if not _text(prompt) or not _text(completion):
            return None, "empty_content"
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": completion}]}, None
    if row.get("text") is not None:
        text = row["text"]
        if not isinstance(text, str):
            return None, "bad_content"
        return ({"text": text}, None) if text.strip() else (None, "empty_content")
    return None, "missing_fields"


BAD_JSON = object()


def _jsonl_rows(path: Path) -> Iterator:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield BAD_JSON


def _parquet_rows(path: Path) -> Iterator:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"Reading {path} needs pyarrow; "
                        "install it with `pip install pyarrow`.") from None
    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def _dataset_rows(path: Path) -> Iterator:
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise DataError(f"Reading the saved dataset {path} needs the `datasets` package; "
                        "install it with `pip install datasets`.") from None
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, Dataset):
        raise DataError(f"{path} holds several splits ({', '.join(dataset)}); pass one split's "
                        f"folder, e.g. {path / next(iter(dataset))}.")
    yield from dataset


def _rows(path: Path) -> Iterator:
    if path.is_dir():
        return _dataset_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    raise DataError(f"{path} is not a supported data file; use JSON Lines (.jsonl), Parquet "
                    "(.parquet) or a folder saved with datasets' save_to_disk.")


def raw_rows(path: str | os.PathLike) -> list:
    """The file's rows as parsed, before normalisation (BAD_JSON marks a line that is not JSON).

    Raises DataError naming the file if it is missing, unreadable or of an unsupported kind.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    try:
        return list(_rows(path))
    except DataError:
        raise
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; JSON Lines files must be UTF-8.") from None
    except Exception as error:  # OSError, a corrupt Parquet file or dataset folder, ...
        raise DataError(f"Could not read {path}: {error}") from None


def read_rows(path: str | os.PathLike) -> tuple[list[dict], ReadReport]:
    """Rows of a JSONL file, Parquet file or saved HF dataset folder, normalised, with a report.

    Raises DataError if the file is missing or unreadable or has no usable row.
    """
    kept, malformed, total = [], Counter(), 0
    for raw in raw_rows(path):
        total += 1
        row, reason = (None, "bad_json") if raw is BAD_JSON else normalize_row(raw)
        if row is None:
            malformed[reason] += 1
        else:
            kept.append(row)
    report = ReadReport(total=total, kept=len(kept), malformed=dict(malformed))
    if not kept:
        raise DataError(f"{path} has no usable rows ({report.summary()}).")
    return kept, report
