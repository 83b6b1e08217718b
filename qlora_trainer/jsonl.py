"""JSON-lines files read row by row, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from qlora_trainer.errors import UserError


def bad_line(path: str | os.PathLike, number: int, line: str) -> str | None:
    """The message for line `number` of `path` if it is not one JSON value, else None."""
    try:
        json.loads(line)
    except json.JSONDecodeError as err:
        return f"{path} line {number}: invalid JSON ({err.msg}): each line must be one JSON object"
    return None


def read_objects(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a UTF-8 JSON-lines file; UserError for a missing file, a
    line that is not a JSON object, or a file without rows. `what` says what the rows hold, for the messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file: give a .jsonl file of {what}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    found = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = bad_line(path, number, line)
        if problem is not None:
            raise UserError(problem)
        row = json.loads(line)
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: expected a JSON object of {what}, got {type(row).__name__}")
        found = True
        yield number, row
    if not found:
        raise UserError(f"{path}: has no rows")
