"""Training data: read texts from JSONL / text / tabular files or a ``datasets`` Hub name, tokenise them for
causal language modelling, and pad batches with the loss masked on padding.

Local JSONL and text files are read here (line numbers in error messages, no ``datasets`` needed); CSV, Parquet,
dataset directories and Hub names go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from adaconvert.errors import InvalidDataError, SourceNotFoundError, first_line
from adaconvert.io.location import is_hub_id
from adaconvert.io.source import parse_json

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}
TABLE_OPTIONS = {".tsv": {"delimiter": "\t"}}  # the `datasets` csv builder reads commas unless told otherwise
IGNORE_INDEX = -100  # label value the loss skips


def load_texts(data: str | Path, *, text_column: str = "text", split: str = "train", data_config=None) -> list[str]:
    """The training texts of ``data``, in order, empty ones left out.

    Args:
        data: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.txt`` (one example per
            non-empty line), ``.csv`` / ``.tsv`` / ``.parquet``, a dataset directory, or a ``datasets`` Hub name.
        text_column: the key / column holding the text (ignored for ``.txt``).
        split, data_config: ``datasets`` split and configuration, for directories and Hub names.

    Returns:
        list of strings, at least one.

    Raises:
        SourceNotFoundError: no such file, or a Hub dataset that cannot be loaded.
        InvalidDataError: empty data, malformed line, missing column, or a non-text value.
    """
    texts = load_columns(data, {text_column: "--text-column"}, split=split, data_config=data_config)[text_column]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidDataError("no training text (the data is empty or every text is blank)", path=data)
    return texts


def load_columns(
    data: str | Path, columns: dict[str, str], *, split: str = "train", data_config=None
) -> dict[str, list[str]]:
    """Some text columns of ``data``, row-aligned, blank values kept (the caller decides which rows it can use).

    Args:
        data: any source :func:`load_texts` reads; a ``.txt`` file has one column, ``text``.
        columns: ``{column: the flag that chooses it}``, the flag named in the message when the column is missing.
        split, data_config: as for :func:`load_texts`.

    Returns:
        ``{column: [value of each row]}``, every list of the same length (``None`` values of a dataset as "").

    Raises:
        SourceNotFoundError, InvalidDataError: as :func:`load_texts`.
    """
    path = Path(data)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            lines = _read_text_lines(path)
            return {column: _text_lines(lines, column, flag, path=path) for column, flag in columns.items()}
        if suffix in JSON_SUFFIXES:
            records = _read_json_records(path)
            return {column: _column(records, column, flag, path=path) for column, flag in columns.items()}
        if suffix in TABLE_SUFFIXES:
            return _from_datasets(
                TABLE_SUFFIXES[suffix],
                columns,
                split="train",
                data_files=str(path),
                where=path,
                **TABLE_OPTIONS.get(suffix, {}),
            )
        raise InvalidDataError(
            f"unknown data file type {suffix!r}; use .jsonl, .json, .txt, .csv, .tsv or .parquet", path=path
        )
    if path.is_dir():
        return _from_datasets(str(path), columns, split=split, where=path)
    if not is_hub_id(str(data)):
        raise SourceNotFoundError("no such data file", path=path)
    return _from_datasets(str(data), columns, split=split, name=data_config, where=str(data))


def _text_lines(lines: list[str], column: str, flag: str, *, path: Path) -> list[str]:
    """A ``.txt`` file's one column: its lines, called ``text`` whatever ``--text-column`` says (as for training)."""
    if flag != "--text-column" and column != "text":
        raise InvalidDataError(f"a .txt file has one column, 'text', not {column!r} ({flag})", path=path)
    return lines


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first record
    except UnicodeDecodeError as exc:
        raise InvalidDataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from exc


def _read_text_lines(path: Path) -> list[str]:
    return _read_text(path).splitlines()


def _read_json_records(path: Path) -> list[dict]:
    """Objects of a JSONL file (or of a ``.json`` file holding a list of objects)."""
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records = parse_json(text, path=path, error=InvalidDataError)
        lines = list(enumerate(records, start=1))
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, parse_json(line, path=path, error=InvalidDataError)))
            except InvalidDataError as exc:
                raise InvalidDataError(f"line {number}: {exc.message}", path=path, line=number) from exc
    records = []
    for number, record in lines:
        if not isinstance(record, dict):
            raise InvalidDataError(f"record {number} is not a JSON object", path=path, line=number)
        records.append(record)
    return records


def _column(records: list[dict], column: str, flag: str, *, path) -> list[str]:
    if not records:
        raise InvalidDataError("no training text (the file is empty)", path=path)
    texts = []
    for number, record in enumerate(records, start=1):
        if column not in record:
            raise InvalidDataError(
                f"record {number} has no column {column!r} (it has: {', '.join(sorted(record)) or 'nothing'}); "
                f"choose one with {flag}",
                path=path,
                line=number,
            )
        value = record[column]
        if not isinstance(value, str):
            raise InvalidDataError(
                f"record {number}: column {column!r} holds {type(value).__name__}, not text", path=path, line=number
            )
        texts.append(value)
    return texts


def _from_datasets(source: str, columns: dict[str, str], *, split: str, where, **kwargs) -> dict[str, list[str]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split, **kwargs)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise SourceNotFoundError(f"cannot load the dataset ({first_line(exc)})", path=where) from exc
    except ValueError as exc:  # unknown split or configuration
        raise InvalidDataError(f"cannot load the dataset ({first_line(exc)})", path=where) from exc
    found = {}
    for column, flag in columns.items():
        if column not in dataset.column_names:
            raise InvalidDataError(
                f"no column {column!r} (columns: {', '.join(dataset.column_names)}); choose one with {flag}",
                path=where,
            )
        values = dataset[column]
        bad = next((i for i, t in enumerate(values) if not isinstance(t, str) and t is not None), None)
        if bad is not None:
            kind = type(values[bad]).__name__
            raise InvalidDataError(f"row {bad}: column {column!r} holds {kind}, not text", path=where)
        found[column] = [t if t is not None else "" for t in values]
    return found


class TokenizedDataset(torch.utils.data.Dataset):
    """Token id lists, one per example, served as ``{"input_ids": [...]}`` for :class:`CausalCollator`."""

    def __init__(self, examples: list[list[int]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.examples[index]}

    @property
    def num_tokens(self) -> int:
        return sum(len(e) for e in self.examples)


def tokenize(texts: list[str], tokenizer, *, max_length: int, where=None) -> TokenizedDataset:
    """Tokenise ``texts`` for causal LM: truncated to ``max_length`` tokens, an EOS appended when the tokenizer has
    one and does not add it itself. Examples of fewer than 2 tokens carry no next-token loss and are left out.

    Raises:
        InvalidDataError: no example has 2 tokens.
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    examples = []
    for ids in encoded:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids[: max_length - 1], eos]
        if len(ids) >= 2:
            examples.append(ids)
    if not examples:
        raise InvalidDataError("no example is 2 tokens long after tokenisation", path=where)
    if len(examples) < len(texts):
        logger.info("left out %d examples shorter than 2 tokens", len(texts) - len(examples))
    return TokenizedDataset(examples)


class CausalCollator:
    """Pad a list of ``{"input_ids": [...]}`` on the right into ``input_ids``, ``attention_mask`` and ``labels``
    (B, T); labels are the input ids with padding set to -100, so padding never counts in the loss (even where
    the pad token is also the EOS token). T is rounded up to ``pad_to_multiple_of``."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
