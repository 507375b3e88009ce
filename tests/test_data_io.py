"""Reading user data: every input form normalised, malformed rows counted by reason."""

import json
import sys

import pytest

from hybridize.data.io import DataError, read_rows
from hybridize.data.synthetic import synthesize, write_jsonl

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}
PAIR = {"prompt": "2+2?", "completion": "4"}
CHAT_PAIR = {"prompt": [{"role": "user", "content": "2+2?"}],
             "completion": [{"role": "assistant", "content": "4"}]}
TEXT = {"text": "Plain pretraining text."}
PAIR_AS_CHAT = {"messages": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}]}


def _jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
                    encoding="utf-8")
    return path


def test_each_input_form_is_normalised_to_messages_or_text(tmp_path):
    rows, report = read_rows(_jsonl(tmp_path / "d.jsonl", [CHAT, PAIR, CHAT_PAIR, TEXT]))
    assert rows == [CHAT, PAIR_AS_CHAT, PAIR_AS_CHAT, TEXT]
    assert (report.total, report.kept, report.malformed) == (4, 4, {})


def test_unknown_fields_are_dropped_metadata_kept_and_messages_take_precedence(tmp_path):
    row = {**CHAT, "text": "ignored", "id": 7, "source": "web",
           "messages": [{**m, "name": "x"} for m in CHAT["messages"]]}
    rows, _ = read_rows(_jsonl(tmp_path / "d.jsonl", [row]))
    assert rows == [{**CHAT, "id": "7"}]


def test_synthetic_task_file_reads_back_as_chat_rows(tmp_path):
    generated = synthesize("arithmetic", 10, seed=0)
    write_jsonl(generated, tmp_path / "train.jsonl")
    rows, report = read_rows(tmp_path / "train.jsonl")
    assert rows == [{k: r[k] for k in ("messages", "answer", "task", "id")} for r in generated]
    assert report.kept == 10


def test_malformed_rows_are_skipped_and_counted_by_reason(tmp_path):
    lines = [
        CHAT, TEXT, "",  # a blank line is not a row
        "{not json", '{"messages": [', "[1, 2]",
        {"id": 3},
        {"messages": []}, {"messages": "hi"}, {"messages": [{"role": "user"}]},
        {"messages": [{"role": "robot", "content": "beep"}]},
        {"messages": [{"role": "user", "content": ["part"]}]},
        {"messages": [{"role": "user", "content": "  "}]},
        {"prompt": "only a prompt"}, {"completion": "only a completion"},
        {"prompt": "q", "completion": 4}, {"prompt": "", "completion": "a"},
        {"text": ""}, {"text": 12},
    ]
    rows, report = read_rows(_jsonl(tmp_path / "d.jsonl", lines))
    assert rows == [CHAT, TEXT]
    assert report.total == 18 and report.kept == 2
    assert report.malformed == {
        "bad_json": 2, "not_an_object": 1, "missing_fields": 1, "bad_messages": 3,
        "bad_role": 1, "bad_content": 3, "empty_content": 3,
        "missing_completion": 1, "missing_prompt": 1,
    }
    assert report.summary().startswith("kept 2 of 18 rows; skipped: bad_content 3, bad_json 2")


def test_file_with_only_malformed_rows_raises_data_error_naming_it(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": []}])
    with pytest.raises(DataError, match=r"bad\.jsonl has no usable rows \(kept 0 of 2 rows"):
        read_rows(path)


def test_empty_file_raises_data_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl has no usable rows"):
        read_rows(tmp_path / "empty.jsonl")


def test_missing_file_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        read_rows(tmp_path / "nope.jsonl")


def test_non_utf8_file_raises_data_error(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin.jsonl is not UTF-8"):
        read_rows(tmp_path / "latin.jsonl")


def test_unsupported_suffix_raises_data_error_listing_formats(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv is not a supported data file.*Parquet"):
        read_rows(tmp_path / "d.csv")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_parquet_without_pyarrow_raises_clear_data_error(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d\.parquet needs pyarrow"):
        read_rows(tmp_path / "d.parquet")


def test_dataset_folder_without_datasets_raises_clear_data_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        read_rows(tmp_path)


def test_parquet_rows_are_read_and_null_columns_mean_absent(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pydict({"prompt": ["2+2?", None, "q", None],
                                  "completion": ["4", None, None, None],
                                  "text": [None, TEXT["text"], None, None],
                                  "messages": [None, None, None, CHAT["messages"]]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows, report = read_rows(tmp_path / "d.parquet")
    assert rows == [PAIR_AS_CHAT, TEXT, CHAT]
    assert report.malformed == {"missing_completion": 1}


def test_corrupt_parquet_raises_data_error_naming_it(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"Could not read .*d\.parquet"):
        read_rows(tmp_path / "d.parquet")


def test_saved_dataset_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([CHAT, CHAT]).save_to_disk(str(tmp_path / "ds"))
    rows, report = read_rows(tmp_path / "ds")
    assert rows == [CHAT, CHAT] and report.kept == 2


def test_saved_dataset_dict_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_list([TEXT])
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"several splits \(train, test\)"):
        read_rows(tmp_path / "dd")
    rows, _ = read_rows(tmp_path / "dd" / "train")
    assert rows == [TEXT]


def test_folder_that_is_not_a_dataset_raises_data_error(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="Could not read"):
        read_rows(tmp_path)
