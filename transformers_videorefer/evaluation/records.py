"""JSON-lines files that survive interruption: append one record per item, resume from what was written."""

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


logger = logging.getLogger(__name__)


def record_key(item_id) -> str:
    """The key an item id is matched by, so that `3` and `"3"` name the same item across files."""
    if isinstance(item_id, bool) or not isinstance(item_id, (int, str)):
        raise TypeError(f"an item id must be an int or a str, got {item_id!r}")
    return str(item_id)


def _json_object(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """
    Reads a JSON-lines file of objects. A last line that is not a complete object (a run killed mid-write) is skipped
    with a warning; any other malformed line raises `ValueError`. A missing file reads as empty.
    """
    path = Path(path)
    if not path.exists():
        return []
    *lines, tail = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _json_object(line)
        if record is None:
            raise ValueError(f"{path}, line {number}: not a JSON object: {line[:80]!r}")
        records.append(record)
    if tail.strip():
        record = _json_object(tail)
        if record is None:
            logger.warning("%s: ignoring an incomplete last line left by an interrupted run: %r", path, tail[:80])
        else:
            records.append(record)
    return records


def truncate_incomplete_tail(path: str | os.PathLike) -> bool:
    """
    Makes a file end with a complete line before more lines are appended: a last line without its newline is
    completed when it is a whole JSON object, and cut off otherwise (a line a killed writer left half-written).
    Returns True if it cut.
    """
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return False
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return False
        keep = 0
        position = size
        while position > 0:
            step = min(65536, position)
            position -= step
            handle.seek(position)
            newline = handle.read(step).rfind(b"\n")
            if newline >= 0:
                keep = position + newline + 1
                break
        handle.seek(keep)
        if _json_object(handle.read().decode("utf-8", "replace")) is not None:
            handle.write(b"\n")
            return False
        handle.truncate(keep)
    return True


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Writes all records to a temporary file beside `path`, syncs it and renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class JsonlAppender:
    """
    Appends records to a JSON-lines file, each as one complete line flushed at once, so that a killed process leaves
    at most one incomplete last line; that line is cut off before anything else is written.

    Args:
        path: the file (created with its folder when missing).
        shared (`bool`, defaults to False): False makes this object the file's only writer while it is open (a second
            one gets a `RuntimeError`); True lets several processes append to the file together, each `write` (and
            `records`) holding the file's lock, so that lines never interleave.
    """

    def __init__(self, path: str | os.PathLike, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        if not shared:
            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                self._handle.close()
                raise RuntimeError(f"{self.path} is being written by another process") from error
            self._cut_incomplete_tail()

    def _cut_incomplete_tail(self) -> None:
        if truncate_incomplete_tail(self.path):
            logger.warning("%s: dropped an incomplete last line left by an interrupted run; it is redone", self.path)

    @contextlib.contextmanager
    def _locked(self):
        if not self.shared:
            yield
            return
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX)
        try:
            self._cut_incomplete_tail()
            yield
        finally:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)

    def records(self) -> list[dict]:
        """The records in the file now (a consistent snapshot, even while other processes append)."""
        with self._locked():
            return read_jsonl(self.path)

    def write(self, record: dict) -> None:
        with self._locked():
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_predictions(path: str | os.PathLike) -> dict[str, dict]:
    """
    Prediction records (JSON lines with at least `id` and a `prediction` string), keyed by `record_key(id)`. A record
    may have an `error` string: the item could not be preprocessed and has no answer (see `preprocessing_failure`).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no predictions file at {path}")
    predictions = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        if "id" not in record or not isinstance(record.get("prediction"), str):
            raise ValueError(f"{path}: record {number} needs `id` and a `prediction` string, got keys {list(record)}")
        if not isinstance(record.get("error"), (str, type(None))):
            raise ValueError(f"{path}: record {number}: `error` must be a string or null, got {record['error']!r:.80}")
        key = record_key(record["id"])
        if key in predictions:
            raise ValueError(f"{path}: id {record['id']!r} appears more than once")
        predictions[key] = record
    if not predictions:
        raise ValueError(f"{path}: no predictions found")
    return predictions


def preprocessing_failure(record: dict) -> str | None:
    """
    Why an item has no answer, for the reports (`"could not be preprocessed: <error>"`), when its prediction record
    carries the `error` inference wrote for it; None for an answered item.
    """
    error = record.get("error")
    return None if error is None else f"could not be preprocessed: {error}"
