"""Read evaluation texts: ``.txt`` (one sample per non-empty line), ``.jsonl`` (one object per line, field ``text``
or ``text_field``), ``.json`` (a list of strings). Bad or empty data raises :class:`DataError` naming file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointNotFound, DataError, InvalidOption

__all__ = ["read_texts", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def _lines(path: Path) -> list[str]:
    # "\n" only (read_text already turned \r\n and \r into it): str.splitlines would also split at U+2028, \x1c ...,
    # which JSON strings may hold raw, breaking a valid .jsonl line in two and shifting every line number after it
    return _text(path).split("\n")


def _text(path: Path) -> str:
    if not path.is_file():  # a FIFO or device would block or never end; a folder cannot be read as text
        raise DataError(f"{path}: not a regular file: give a .txt, .jsonl or .json file")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not part of the text
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason}): save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}): check the path and its permissions") from None


def _from_txt(path: Path) -> list[str]:
    return [line for line in _lines(path) if line.strip()]


def _from_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for i, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i}: not a JSON object ({exc.msg}): one JSON object per line") from None
        except RecursionError:
            raise DataError(f"{path}:{i}: JSON nested too deeply: one flat JSON object per line") from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(sorted(record)[:8]) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{i}: no field {field!r} (found: {keys}): pass --text-field NAME")
        if not isinstance(record[field], str):
            raise DataError(f"{path}:{i}: field {field!r} is {type(record[field]).__name__}, not a string")
        if record[field].strip():
            texts.append(record[field])
    return texts


def _from_json(path: Path) -> list[str]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}): expected a list of strings") from None
    except RecursionError:
        raise DataError(f"{path}:1: JSON nested too deeply: expected a flat list of strings") from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: a JSON {type(data).__name__}, expected a list of strings (or use .jsonl)")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise DataError(f"{path}: item {i} of the list is {type(item).__name__}, not a string: expected a list "
                            f"of strings")
    return [t for t in data if t.strip()]


def read_texts(path: str | os.PathLike, *, text_field: str | None = None, max_samples: int | None = None) -> list[str]:
    """The samples of ``path`` in file order (the first ``max_samples``); empty samples are skipped.

    Raises :class:`DataError` (file and line) for malformed content or a file with no sample at all."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"data file {path} does not exist: check --data")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise InvalidOption(f"--data {path}: unknown suffix {path.suffix or '(none)'}: use .txt (one sample per "
                            f"line), .jsonl (field 'text') or .json (a list of strings)")
    if text_field is not None and suffix != ".jsonl":
        raise InvalidOption(f"--text-field applies to .jsonl data only, not {path.name}")
    if max_samples is not None and max_samples < 1:
        raise InvalidOption(f"--max-samples {max_samples} must be 1 or more")
    if suffix == ".txt":
        texts = _from_txt(path)
    elif suffix == ".jsonl":
        texts = _from_jsonl(path, text_field or "text")
    else:
        texts = _from_json(path)
    if not texts:
        raise DataError(f"{path}:1: no sample (every line or item is empty): give a file with at least one text")
    return texts[:max_samples] if max_samples is not None else texts
