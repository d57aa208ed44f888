import json
import sys

import pytest

from egspo.tasks.data import (
    DataError,
    FieldError,
    as_int,
    generator_rng,
    load_rows,
    read_records,
    split_of,
    text_field,
)


def _to_row(fields):
    return {"question": text_field(fields, "question"), "target": as_int(fields.get("target"), "target")}


def test_jsonl_json_and_csv_rows(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "q1", "target": 3}\n\n{"question": "q2", "target": "4"}\n')
    (tmp_path / "d.json").write_text(json.dumps([{"question": "q1", "target": 3}]))
    (tmp_path / "d.csv").write_text("question,target\nq1,3\nq2,4\n")
    assert load_rows(str(tmp_path / "d.jsonl"), "train", _to_row)[1] == {"question": "q2", "target": 4}
    assert load_rows(str(tmp_path / "d.json"), "test", _to_row) == [{"question": "q1", "target": 3}]
    records = list(read_records(str(tmp_path / "d.csv")))
    assert [r.where.rsplit(" ", 1)[1] for r in records] == ["2", "3"]  # file lines, after the header


def test_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q1", "target": 3}\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: field 'target'"):
        load_rows(str(path), "train", _to_row)
    path.write_text('{"question": "q1", "target": 3}\n{"question": "q2", "target": "x"}\n')
    with pytest.raises(DataError, match=r"line 2: field 'target' must be an integer, got 'x'"):
        load_rows(str(path), "train", _to_row)
    path.write_text('{"question": "q1", "target": 3}\n{"question": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: invalid JSON"):
        load_rows(str(path), "train", _to_row)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_rows(str(path), "train", _to_row)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("question,target\nq1,3\n,4\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: field 'question' must be a non-empty string"):
        load_rows(str(csv_path), "train", _to_row)


def test_missing_unsupported_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "train", _to_row)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(str(tmp_path / "d.txt"), "train", _to_row)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_rows(str(tmp_path / "e.jsonl"), "train", _to_row)


def test_optional_packages_missing_give_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install 'egspo\[data\]'"):
        load_rows("someone/some-dataset", "train", _to_row)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'egspo\[data\]'"):
        load_rows(str(tmp_path / "d.parquet"), "train", _to_row)


def test_parquet_rows_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q1"], "target": [5]}), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet"), "train", _to_row) == [{"question": "q1", "target": 5}]


def test_field_helpers():
    assert text_field({"b": 5}, "a", "b") == "5"
    with pytest.raises(FieldError, match=r"field 'a' is missing \(also accepted: b\)"):
        text_field({}, "a", "b")
    assert as_int(4.0, "n") == 4 and as_int(" -3 ", "n") == -3
    for bad in (True, 2.5, "2.5", None):
        with pytest.raises(FieldError):
            as_int(bad, "n")


def test_generator_randomness_is_deterministic_and_split_dependent():
    assert generator_rng("t", "train", 1).random() == generator_rng("t", "train", 1).random()
    assert generator_rng("t", "train", 1).random() != generator_rng("t", "test", 1).random()
    with pytest.raises(ValueError, match="split='eval'"):
        generator_rng("t", "eval", 1)
    shares = [split_of(str(i)) for i in range(2000)]
    assert 100 < shares.count("test") < 300


def test_hub_source_through_datasets(monkeypatch):
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return [{"question": "q", "target": 1}, {"question": "q"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"openai/x:main \[test\] row 1: field 'target'"):
        load_rows("openai/x:main", "test", _to_row)
    assert calls == [("openai/x", "main", "test")]
    with pytest.raises(DataError, match=r"Cannot load hub dataset 'missing/set' \(split 'train'\): Dataset"):
        load_rows("missing/set", "train", _to_row)


def test_builtin_reference_sets_and_unknown_names(monkeypatch):
    from egspo.evaluate import load_eval_rows
    from egspo.tasks import get_task

    # what a user passes as task.eval_file or `egspo eval --data`: the shipped sets, never the hub
    monkeypatch.setitem(sys.modules, "datasets", None)
    rows = load_eval_rows(get_task("countdown"), "builtin:countdown-test", num_eval=1, seed=0, limit=None)
    assert len(rows) == 256
    with pytest.raises(DataError, match=r"'builtin:sudoku' is not a built-in data set; the built-in ones are "
                                        r"builtin:sudoku-test, builtin:countdown-test\."):
        list(read_records("builtin:sudoku"))
