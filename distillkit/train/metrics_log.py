"""metrics.jsonl: one JSON record per line, appended as the run goes, made consistent again on resume.

A run killed after its last checkpoint has logged steps that its resumption trains (and logs) again, and a
kill in the middle of a write leaves a torn last line that the next append would run into. `trim_to_step`
keeps, before a resume, only whole records of steps up to the checkpoint's, so every step appears once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import write_text


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def trim_to_step(path: Path, step: int) -> int:
    """Drop torn lines and records of steps after `step` (records without a step stay); returns how many
    lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or record.get("step", 0) > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text(path, "".join(kept))
    return dropped
