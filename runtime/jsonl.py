"""JSON-lines files (evaluation data, calibration data, benchmark workloads): the rows with their line numbers, and
one error for a line that is not JSON, naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def jsonl_rows(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number from 1, the parsed value) of every non-blank line of ``path``; a line that is not valid JSON
    raises ``error`` ("PATH:LINE: not valid JSON (...)")."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e})") from None
            yield n, row
