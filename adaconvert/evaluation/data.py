"""What ``eval`` measures on: the texts scored for loss, and the prompt/reference pairs it generates from.

Texts are read with ``train``'s own reader (:func:`adaconvert.training.data.load_columns`), so every source ``train``
reads works here too, and tokenised with ``train``'s own rule (:func:`adaconvert.training.data.tokenize`): the loss
is the one training minimised, on other data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adaconvert.errors import InvalidConfigError, InvalidDataError
from adaconvert.training.data import load_columns


@dataclass
class EvalData:
    """Rows of one eval source.

    Attributes:
        source: the data as given.
        texts: what the loss is computed on, one per usable row (never empty).
        prompts: generation prompts of the rows that have a prompt/reference pair (empty: no generation metrics).
        references: the expected answer of each prompt, same length as ``prompts``.
    """

    source: str
    texts: list[str]
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    @property
    def has_pairs(self) -> bool:
        return bool(self.prompts)


def load_eval_data(
    data: str | Path,
    *,
    text_column: str = "text",
    prompt_column: str | None = None,
    reference_column: str | None = None,
    split_on: str | None = None,
    split: str = "train",
    data_config: str | None = None,
    limit: int | None = None,
) -> EvalData:
    """Read eval rows: texts for the loss, and prompt/reference pairs where the data has them.

    Three ways to find pairs:

    - none of ``prompt_column``, ``reference_column``, ``split_on``: loss only, on ``text_column``;
    - ``prompt_column`` and ``reference_column``: the pair is those two columns; the loss text is the prompt and
      the reference joined by one space (none when the prompt ends, or the reference starts, with whitespace);
    - ``split_on`` (a marker such as ``"answer :"``): the loss text is ``text_column``; a row that contains the
      marker is also a pair: the prompt is the text up to and including its first occurrence, the reference the
      rest, stripped. Rows without the marker count for the loss only.

    Args:
        data: any source ``train`` reads (``.jsonl``, ``.json``, ``.txt``, ``.csv``/``.tsv``/``.parquet``, a
            dataset directory, a Hub dataset name).
        limit: keep the first ``limit`` usable rows.

    Returns:
        The :class:`EvalData`; ``texts`` is never empty, and holds one pair per row with pairs.

    Raises:
        InvalidConfigError: one of the two pair columns without the other, both ways at once, a bad ``limit``.
        InvalidDataError: no usable row, a missing column, or a marker no row contains.
        SourceNotFoundError: no such file or dataset.
    """
    if (prompt_column is None) != (reference_column is None):
        raise InvalidConfigError("--prompt-column and --reference-column go together: give both or neither")
    if prompt_column is not None and split_on is not None:
        raise InvalidConfigError("give either --prompt-column/--reference-column or --split-on, not both")
    if split_on is not None and not split_on.strip():
        raise InvalidConfigError("--split-on must not be blank")
    if limit is not None and limit < 1:
        raise InvalidConfigError(f"--limit must be at least 1, got {limit}")
    options = {"split": split, "data_config": data_config}
    if prompt_column is not None:
        columns = {prompt_column: "--prompt-column", reference_column: "--reference-column"}
        found = load_columns(data, columns, **options)
        rows = [
            (_join(p, r), p, r.strip())
            for p, r in zip(found[prompt_column], found[reference_column], strict=True)
            if p.strip() and r.strip()
        ]
    else:
        texts = load_columns(data, {text_column: "--text-column"}, **options)[text_column]
        rows = [(t, *_split(t, split_on)) for t in texts if t.strip()]
        if split_on is not None and not any(prompt for _, prompt, _ in rows):
            raise InvalidDataError(f"no row contains the --split-on marker {split_on!r}", path=data)
    rows = rows[:limit]
    if not rows:
        what = "prompt and reference" if prompt_column is not None else "text"
        raise InvalidDataError(f"no usable eval row (every {what} is blank)", path=data)
    pairs = [(prompt, reference) for _, prompt, reference in rows if prompt]
    return EvalData(
        source=str(data),
        texts=[text for text, _, _ in rows],
        prompts=[p for p, _ in pairs],
        references=[r for _, r in pairs],
    )


def _join(prompt: str, reference: str) -> str:
    return prompt + reference if prompt[-1:].isspace() or reference[:1].isspace() else f"{prompt} {reference}"


def _split(text: str, marker: str | None) -> tuple[str, str]:
    """(prompt, reference) of one text at ``marker``; ("", "") without a pair (no marker, or nothing after it)."""
    at = text.find(marker) if marker else -1
    if at < 0:
        return "", ""
    end = at + len(marker)
    reference = text[end:].strip()
    return (text[:end], reference) if reference else ("", "")
