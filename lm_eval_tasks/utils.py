"""Loading hybridize's chat JSONL rows for lm-evaluation-harness; standalone (no hybridize import)."""

import json

import datasets


def load_rows(data_file=None, **_):
    """The rows of `data_file` (given with --metadata) as the task's test split.

    lm-eval passes every metadata and model argument here; only `data_file` is ours.
    """
    if not data_file:
        raise ValueError('hybridize_synth needs the data file: --metadata \'{"data_file": "test.jsonl"}\'')
    with open(data_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"prompt": _prompt(row["messages"]), "answer": str(row["answer"])} for row in rows])})


def _prompt(messages):
    """The last user turn before the final assistant turn: what the model must answer."""
    turns = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return next(m["content"] for m in reversed(turns) if m["role"] == "user")


def doc_to_text(doc):
    return doc["prompt"]
