"""The output folder: ``results.jsonl`` with its record statuses (``DONE``, ``FAILED``, ``GAVE_UP``,
``SUBMITTED``), ``ResultStore`` (the resume bookkeeping) and ``read_results``."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterable

RESULTS_NAME = "results.jsonl"
VIDEO_DIR = "videos"
DONE = "ok"
FAILED = "error"  # the item itself is bad (validation or execution error): not retried unless asked
GAVE_UP = "gave_up"  # transient failures exhausted the retries: retried on the next run
SUBMITTED = "submitted"  # queued on ``server`` as ``prompt_id``, not collected yet: a rerun collects it there


class ResultStore:
    """``results.jsonl``: appended as items finish (crash-safe), compacted at the end; the last record of an
    id wins. A line cut short by a crash is ignored."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    self.records[str(record["id"])] = record

    def is_done(self, ident: str, retry_failed: bool = False) -> bool:
        status = self.records.get(ident, {}).get("status")
        return status == DONE or (status == FAILED and not retry_failed)

    def add(self, record: dict) -> None:
        with self._lock:
            self.records[record["id"]] = record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()

    def compact(self, order: Iterable[str]) -> None:
        """Rewrite with one line per id: manifest order first, then ids no longer in the manifest."""
        with self._lock:
            order = [i for i in order if i in self.records]
            rest = [i for i in self.records if i not in set(order)]
            temp = self.path.with_name(self.path.name + ".tmp")
            temp.write_text("".join(json.dumps(self.records[i], ensure_ascii=False) + "\n" for i in order + rest),
                            encoding="utf-8")
            os.replace(temp, self.path)


def read_results(path: str | os.PathLike) -> list[dict]:
    return list(ResultStore(Path(path)).records.values())
