"""Benchmarks keep every run: the latest run stays in <name>.json / .md (what the README links), and each run is
also appended to <name>_history.jsonl next to it, stamped with date, commit and command (the first append also
keeps the run the latest file held before history was kept)."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return out.stdout.strip() or "unknown"


def keep_history(latest_json: Path | str, run: dict) -> dict:
    """Stamp `run` (date, commit, command unless it has them) and append it to the history of `latest_json`;
    returns the stamped run, which the caller then writes as the latest."""
    latest_json = Path(latest_json)
    run.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    run.setdefault("commit", _commit())
    run.setdefault("command", " ".join(["python", *sys.argv]))
    history = latest_json.with_name(latest_json.stem + "_history.jsonl")
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a") as f:
        if not history.stat().st_size and latest_json.is_file():
            try:
                f.write(json.dumps(json.loads(latest_json.read_text())) + "\n")
            except json.JSONDecodeError:  # a latest file that is not one JSON document: nothing to keep
                pass
        f.write(json.dumps(run) + "\n")
    return run
