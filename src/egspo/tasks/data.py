"""Reading task data: local jsonl/json/csv/parquet files or hub datasets, with located errors.

A source is a local file (by extension), a reference test set shipped with the package
(``builtin:sudoku-test``, ``builtin:countdown-test``; see :data:`BUILTIN_DATA`) or, when no such file
exists, a hub dataset name read through the optional ``datasets`` package (``name`` or ``name:config``,
e.g. ``openai/gsm8k:main``). Every raw row is a :class:`Record` that knows where it came from, so a
task's row converter can raise :class:`FieldError` and the reader turns it into a :class:`DataError`
naming the file, line and field:

    rows = load_rows("train.jsonl", "train", task.to_row)
    # DataError: train.jsonl line 12: field 'target' is missing

The generator helpers at the end give the built-in puzzle generators deterministic, split-disjoint
randomness.
"""

from __future__ import annotations

import csv
import json
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SPLITS = ("train", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN_PREFIX = "builtin:"
#: Reference test sets shipped in ``egspo/assets/data`` (the d1 project's, Apache-2.0; README.md there).
BUILTIN_DATA = {
    "sudoku-test": "4x4_test_sudoku.csv",  # 500 4x4 puzzles, 8 empty cells each
    "countdown-test": "countdown_cd3_test.jsonl",  # 256 problems with 3 numbers
}


class DataError(ValueError):
    """Malformed or unreadable data; the message names the source, the line or row, and the field."""


class FieldError(DataError):
    """One field of a row is missing or malformed (the reader adds where the row came from)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")
        self.field = field


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (``"data.jsonl line 3"``), for error messages."""

    where: str
    fields: dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# Reading


def read_records(source: str, split: str = "train") -> Iterator[Record]:
    """Raw rows of a local file (jsonl, json list, csv, parquet), a ``builtin:`` set or a hub dataset's ``split``."""
    if source.startswith(BUILTIN_PREFIX):
        yield from _read_file(builtin_data_path(source))
        return
    path = Path(source)
    if path.is_file():
        yield from _read_file(path)
    elif path.suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"Data file {source} does not exist.")
    else:
        yield from _read_hub(source, split)


def builtin_data_path(source: str) -> Path:
    """The file of a shipped data set named ``builtin:NAME``."""
    name = source[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_DATA:
        known = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_DATA)
        raise DataError(f"{source!r} is not a built-in data set; the built-in ones are {known}.")
    path = Path(str(resources.files("egspo") / "assets" / "data" / BUILTIN_DATA[name]))
    if not path.is_file():
        raise DataError(f"{source} is missing from this installation (expected {path}): reinstall egspo.")
    return path


def convert_records(records: Iterable[Record], convert: Callable[[dict[str, Any]], T]) -> list[T]:
    """Apply a row converter, turning its :class:`FieldError` into a :class:`DataError` with the location."""
    out = []
    for record in records:
        try:
            out.append(convert(record.fields))
        except FieldError as exc:
            raise DataError(f"{record.where}: {exc}") from None
    return out


def load_rows(source: str, split: str, convert: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Read ``source`` and convert every row with a task's converter; an empty source is an error."""
    rows = convert_records(read_records(source, split), convert)
    if not rows:
        raise DataError(f"{source} has no rows.")
    return rows


def _read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for fields in reader:
                yield Record(f"{path} line {reader.line_num}", dict(fields))
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}.")


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg}).") from None
            yield _json_record(where, fields)


def _read_json(path: Path) -> Iterator[Record]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}).") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(items).__name__}.")
    for index, fields in enumerate(items):
        yield _json_record(f"{path} item {index}", fields)


def _json_record(where: str, value: Any) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}.")
    return Record(where, value)


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"Reading {path} needs pyarrow: pip install 'egspo[data]'.") from None
    for index, fields in enumerate(pq.read_table(path).to_pylist()):
        yield Record(f"{path} row {index}", fields)


def _read_hub(source: str, split: str) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a local file, and loading it as a hub dataset needs the datasets package: "
            "pip install 'egspo[data]'."
        ) from None
    name, _, config = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # not found, no network, no such split or config: say which source failed
        raise DataError(f"Cannot load hub dataset {source!r} (split {split!r}): {exc}") from exc
    for index, fields in enumerate(dataset):
        yield Record(f"{source} [{split}] row {index}", dict(fields))


# ---------------------------------------------------------------------------------------------------
# Field access for row converters


def get_field(fields: dict[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present (aliases accept other data formats)."""
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    also = f" (also accepted: {', '.join(names[1:])})" if len(names) > 1 else ""
    raise FieldError(names[0], f"is missing{also}")


def text_field(fields: dict[str, Any], *names: str) -> str:
    """A non-empty string field (numbers are accepted and turned into text)."""
    value = get_field(fields, *names)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise FieldError(names[0], f"must be a non-empty string, got {value!r}")
    return str(value)


def as_int(value: Any, field: str) -> int:
    """An integer from an int, an integral float or a decimal string."""
    if isinstance(value, bool):
        raise FieldError(field, f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise FieldError(field, f"must be an integer, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Generators


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}.")


def generator_rng(task: str, split: str, seed: int) -> random.Random:
    """A generator's random stream: train and test of the same seed draw from different streams."""
    check_split(split)
    # String seeds are hashed with SHA-512 by `random`, so they are stable across runs and platforms.
    return random.Random(f"{task}/{split}/{seed}")


def split_of(key: str) -> str:
    """The split a generated problem belongs to (1 in 10 is test), so train and test never overlap."""
    return "test" if zlib.crc32(key.encode()) % 10 == 0 else "train"
