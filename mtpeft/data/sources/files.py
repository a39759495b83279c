"""Local record files: an Alpaca-style JSON list or JSON Lines, read with errors that point at the line.

``read_rows(path)`` returns ``(row, where)`` pairs, ``where`` being ``"<file> line N"`` (JSON Lines) or
``"<file> record #i"`` (JSON list) so that a missing field can be found in the file. A ``.jsonl`` /
``.ndjson`` file, or any file whose first non-blank character is not ``[``, is JSON Lines (blank lines
are allowed); a file starting with ``[`` is one JSON list. Malformed JSON raises ValueError naming the
file, line and column; an empty file or list is an error too (an empty task would train on nothing).
Relative paths are resolved against the directory the run was started from (``hydra.utils.
to_absolute_path``: Hydra may change the working directory of a job).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")


def resolve_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute against the original working directory."""
    return Path(to_absolute_path(str(Path(path).expanduser())))


def read_rows(path: str | Path) -> list[tuple[Any, str]]:
    """All rows of a JSON list or JSON Lines file, each with a ``where`` string for error messages."""
    file = resolve_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"data file {str(path)!r} not found (looked at {file}); relative paths are taken from the "
            "directory the run was started in"
        )
    content = file.read_text(encoding="utf-8")
    if file.suffix.lower() in JSONL_SUFFIXES or not content.lstrip().startswith("["):
        rows = _json_lines(content, file)
    else:
        rows = _json_list(content, file)
    if not rows:
        raise ValueError(f"{file}: no records (the file is empty); an empty task cannot be trained or scored")
    return rows


def _json_lines(content: str, file: Path) -> list[tuple[Any, str]]:
    """One JSON value per non-blank line."""
    rows = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{file} line {number}"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{file} line {number}: malformed JSON ({err.msg} at column {err.colno}); read as JSON Lines "
                "(one complete JSON object per line) because the file does not start with '['"
            ) from err
    return rows


def _json_list(content: str, file: Path) -> list[tuple[Any, str]]:
    """A JSON array of records."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from err
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of records, got {type(data).__name__}")
    return [(row, f"{file} record #{i}") for i, row in enumerate(data)]
