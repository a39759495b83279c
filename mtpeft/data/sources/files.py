"""Local record files: an Alpaca-style JSON list or JSON Lines, read with errors that point at the line.

``read_rows(path)`` returns ``(row, where)`` pairs, ``where`` being ``"<file> line N"`` (JSON Lines) or
``"<file> record #i"`` (JSON list) so that a missing field can be found in the file. A ``.jsonl`` /
``.ndjson`` file, or any file whose first non-blank character is not ``[``, is JSON Lines (blank lines
are allowed); a file starting with ``[`` is one JSON list. Malformed JSON raises ValueError naming the
file, line and column; bytes that are not UTF-8 name the file, line and byte offset; a ``.json`` file
holding one JSON object (not a list) is an error that says a list of records was expected; a directory
is reported as such; an empty file or list is an error too (an empty task would train on nothing).
``check_data_file`` runs the path checks alone, so that a run can check its files before loading a model.
Relative paths are resolved against the directory the run was started from (``hydra.utils.
to_absolute_path``: Hydra may change the working directory of a job).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")


def resolve_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute against the original working directory."""
    return Path(to_absolute_path(str(Path(path).expanduser())))


def check_data_file(path: str | Path) -> Path:
    """The resolved path of data file ``path``; a missing file or a directory is an error saying which."""
    file = resolve_path(path)
    if file.is_dir():
        inside = sorted(p.name for p in file.iterdir() if p.suffix.lower() in (".json", *JSONL_SUFFIXES))
        hint = f" (it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''})" if inside else ""
        raise IsADirectoryError(
            f"data file {str(path)!r} is a directory ({file}); list the JSON / JSON Lines files inside it"
            f"{hint} one by one, e.g. [{file / (inside[0] if inside else 'a.json')}]"
        )
    if not file.is_file():
        raise FileNotFoundError(
            f"data file {str(path)!r} not found (looked at {file}); relative paths are taken from the "
            "directory the run was started in"
        )
    return file


def read_rows(path: str | Path) -> list[tuple[Any, str]]:
    """All rows of a JSON list or JSON Lines file, each with a ``where`` string for error messages."""
    file = check_data_file(path)
    content = _decode(file.read_bytes(), file)
    if file.suffix.lower() not in JSONL_SUFFIXES and content.lstrip().startswith("{"):
        _reject_single_object(content, file)
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


def _decode(data: bytes, file: Path) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped); a bad byte names line and offset."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start  # in the file, byte-order mark included
        line_start = data.rfind(b"\n", 0, offset) + 1
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"{file} line {line}: byte 0x{data[offset]:02x} at byte offset {offset} (byte "
            f"{offset - line_start + 1} of the line) is not valid UTF-8 ({err.reason}); data files must be "
            f"UTF-8: convert it, e.g. iconv -f latin1 -t utf-8 {file.name} > {file.stem}.utf8{file.suffix}"
        ) from None


def _reject_single_object(content: str, file: Path) -> None:
    """A ``.json`` file that is one JSON object (not JSON Lines, not a list) is an error naming the fix."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return  # several objects (JSON Lines named .json) or malformed: the JSON Lines reader reports it
    if not isinstance(data, dict):
        return
    lists = [key for key, value in data.items() if isinstance(value, list) and value]
    hint = (
        f"; its key {lists[0]!r} holds a list of {len(data[lists[0]])} items: save that list alone"
        if lists
        else ""
    )
    raise ValueError(
        f"{file}: expected a list of records ([{{...}}, {{...}}]) or JSON Lines (one record per line), got "
        f"one JSON object with keys {sorted(data)[:8]}{hint}; a single record goes in a list, or in a "
        ".jsonl file"
    )
