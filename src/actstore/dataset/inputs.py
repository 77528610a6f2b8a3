"""Reading a corpus: rows of text (or chat messages) and label columns, streamed.

Accepted inputs (decided by what ``path`` is):

* ``*.jsonl`` / ``*.json``: one JSON object per line;
* ``*.parquet``: a Parquet file (read in record batches through pyarrow);
* ``*.txt``: one sequence per non-empty line;
* a folder of ``*.txt`` files: one sequence per file (sorted by name, whole content);
* a folder written by ``datasets.Dataset.save_to_disk``: read with ``load_from_disk``.

Rows are streamed (memory stays flat however large the corpus); :func:`open_corpus`
checks the columns and every row up front (one streamed pass) and counts them, and :meth:`Corpus.fingerprint` hashes
the bytes of the input, so a resumed capture knows it reads the same corpus.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actstore.errors import ActstoreError


class CorpusError(ActstoreError, ValueError):
    """The corpus cannot be read as asked: a missing file, an unknown format, a column
    that is not there, a row that is not text."""


@dataclass(frozen=True)
class Row:
    """One sequence of the corpus: its text or its messages, and its labels."""

    text: str | None
    messages: list[dict[str, str]] | None
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Corpus:
    path: Path
    kind: str  # "jsonl", "parquet", "txt", "txt-folder", "hf-disk"
    text_column: str
    messages_column: str | None
    label_columns: tuple[str, ...]
    n_rows: int

    def fingerprint(self) -> str:
        """sha256 of the input's bytes (file names included for a folder)."""
        h = hashlib.sha256()
        for f in _content_files(self.path, self.kind):
            h.update(str(f.relative_to(self.path) if self.path.is_dir() else f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def rows(self) -> Iterator[Row]:
        """Every row, in order, checked."""
        for i, record in enumerate(self._records()):
            yield self._row(i, record)

    # ---- per format -------------------------------------------------------------------
    def _records(self) -> Iterator[dict[str, Any]]:
        if self.kind == "jsonl":
            with open(self.path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        yield _json_line(self.path, n, line)
        elif self.kind == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=1024, columns=self._columns()):
                yield from batch.to_pylist()
        elif self.kind == "txt":
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield {self.text_column: line.rstrip("\r\n")}
        elif self.kind == "txt-folder":
            for f in _content_files(self.path, self.kind):
                yield {self.text_column: f.read_text(encoding="utf-8")}
        else:
            ds = _load_disk(self.path).select_columns(self._columns())
            for batch in ds.iter(batch_size=1024):
                names = list(batch)
                yield from (dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True))

    def _columns(self) -> list[str]:
        return [self.messages_column or self.text_column, *self.label_columns]

    def _row(self, index: int, record: dict[str, Any]) -> Row:
        labels = {}
        for c in self.label_columns:
            if c not in record:
                raise CorpusError(f"{self.path}: row {index} has no label column {c!r} (check --label-column)")
            labels[c] = record[c]
        if self.messages_column is not None:
            msgs = record.get(self.messages_column)
            if not _is_messages(msgs):
                raise CorpusError(
                    f"{self.path}: row {index}, column {self.messages_column!r} is not a list of "
                    "{role, content} messages (check --messages-column)"
                )
            assert msgs is not None
            return Row(None, [{"role": m["role"], "content": m["content"]} for m in msgs], labels)
        text = record.get(self.text_column)
        if not isinstance(text, str):
            what = "has no" if self.text_column not in record else "has a non-text"
            raise CorpusError(
                f"{self.path}: row {index} {what} text column {self.text_column!r} "
                "(name the column with --text-column, or --messages-column for chat messages)"
            )
        return Row(text, None, labels)


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )  # fmt: skip


def _json_line(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: line {n} is not JSON ({e.msg}); write one JSON object per line") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{path}: line {n} is not a JSON object; write one object per line")
    return record


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_disk(path: Path) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise CorpusError(f"{path}: a DatasetDict with splits {list(ds)}; pass one split's folder, e.g. {path}/train")
    return ds


def _content_files(path: Path, kind: str) -> list[Path]:
    if kind == "txt-folder":
        return sorted(path.glob("*.txt"))
    if kind == "hf-disk":
        return sorted(f for f in path.rglob("*") if f.is_file())
    return [path]


def _kind(path: Path) -> str:
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder (give a .jsonl, .parquet or .txt file, or a folder)")
    if path.is_dir():
        if _is_hf_disk(path):
            return "hf-disk"
        if any(path.glob("*.txt")):
            return "txt-folder"
        raise CorpusError(
            f"{path}: a folder with neither .txt files nor a dataset saved with save_to_disk "
            "(give a .jsonl, .parquet or .txt file, or such a folder)"
        )
    suffix = path.suffix.lower()
    kinds = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
    if suffix not in kinds:
        raise CorpusError(f"{path}: unknown input format {suffix or '(no suffix)'!r}; use .jsonl, .parquet or .txt")
    return kinds[suffix]


def _count_and_columns(path: Path, kind: str) -> tuple[int, set[str] | None]:
    """Row count, and the column names when the format declares them (None: per row)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors are many; all mean "not Parquet"
            raise CorpusError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
        return f.metadata.num_rows, set(f.schema_arrow.names)
    if kind == "hf-disk":
        ds = _load_disk(path)
        return len(ds), set(ds.column_names)
    if kind == "txt-folder":
        return len(_content_files(path, kind)), None
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip()), None
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8 text") from None


def open_corpus(
    path: str | Path,
    *,
    text_column: str = "text",
    messages_column: str | None = None,
    label_columns: tuple[str, ...] | list[str] = (),
) -> Corpus:
    """A corpus to stream, its columns checked where the format names them (Parquet,
    datasets) and on every row otherwise. An empty corpus is an error."""
    p = Path(path)
    kind = _kind(p)
    if kind in ("txt", "txt-folder") and (messages_column or label_columns):
        raise CorpusError(f"{p}: plain text has no columns; --messages-column and --label-column need JSONL, Parquet or a saved dataset")
    n, columns = _count_and_columns(p, kind)
    if columns is not None:
        for c, opt in [(messages_column or text_column, "--messages-column" if messages_column else "--text-column"),
                       *((c, "--label-column") for c in label_columns)]:  # fmt: skip
            if c not in columns:
                raise CorpusError(f"{p}: no column {c!r} (has: {', '.join(sorted(columns))}); check {opt}")
    corpus = Corpus(p, kind, text_column, messages_column, tuple(label_columns), n)
    # Every row is checked now, streamed, so a bad row fails before anything is written.
    checked = sum(1 for _ in corpus.rows())
    if checked == 0:
        raise CorpusError(f"{p}: the corpus holds no rows")
    return corpus if checked == n else Corpus(p, kind, text_column, messages_column, tuple(label_columns), checked)
