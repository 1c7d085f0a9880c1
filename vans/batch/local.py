"""Answer every row of a manifest in this process, without a ComfyUI server:
``python -m vans answer --manifest MANIFEST --out DIR`` (the models are loaded once).

It writes the same output folder as ``python -m vans batch`` (``DIR/results.jsonl``, ``DIR/videos/<id>.mp4``),
so ``python -m vans eval DIR/results.jsonl --gt MANIFEST`` scores it, and it resumes the same way: items whose
last record is ``ok`` are skipped on a rerun, and a bad item (an unreadable video, an empty caption) is
recorded ``error`` with its message and never stops the others. Each item's ``seed`` column, when present,
replaces ``--seed`` for that item (caption sampling and video noise).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from ..errors import InputError
from .manifest import Item, safe_name
from .results import DONE, FAILED, RESULTS_NAME, VIDEO_DIR, ResultStore


def answer_manifest(models, items: list[Item], out_dir: str | Path, settings, *, record_extra: dict | None = None,
                    retry_failed: bool = False, stream: TextIO | None = sys.stderr) -> dict[str, int]:
    """Answer ``items`` with ``models`` (``vans.pipeline.VansModels``) and ``settings``
    (``vans.pipeline.AnswerSettings``); returns the count of each final status."""
    from ..pipeline import answer
    from ..video import write_video

    out = Path(out_dir)
    store = ResultStore(out / RESULTS_NAME)
    todo = [item for item in items if not store.is_done(item.id, retry_failed)]
    if stream:
        print(f"answer: {len(todo)} to run, {len(items) - len(todo)} already done", file=stream, flush=True)
    for number, item in enumerate(todo, start=1):
        seed = settings.seed if item.seed is None else item.seed
        started = time.monotonic()
        record = {"id": item.id, "question": item.question, "input_video": item.video, "caption": "", "think": "",
                  "video": "", "videos": [], "seed": seed, **(record_extra or {})}
        for key in ("ground_truth", "gt_video", "split"):
            if getattr(item, key) is not None:
                record[key] = getattr(item, key)
        try:
            ans = answer(models, item.video, item.question, replace(settings, seed=seed))
            relative = f"{VIDEO_DIR}/{safe_name(item.id)}.mp4"
            (out / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
            write_video(out / relative, ans.frames, ans.fps)
            record.update(caption=ans.caption, think=ans.think, video=relative, videos=[relative], status=DONE,
                          error="", timings={k: round(v, 3) for k, v in ans.timings.items()})
        except InputError as exc:  # this item is bad; the next one may be fine
            record.update(status=FAILED, error=str(exc))
        record["seconds"] = round(time.monotonic() - started, 3)
        store.add(record)
        if stream:
            tail = record["error"] or repr(record["caption"])
            print(f"[{number}/{len(todo)}] {record['status']:7s} {item.id} {record['seconds']:.1f}s {tail}"[:160],
                  file=stream, flush=True)
    store.compact([item.id for item in items])
    counts: dict[str, int] = {}
    for item in items:
        status = store.records.get(item.id, {}).get("status", "missing")
        counts[status] = counts.get(status, 0) + 1
    return counts
