"""The manifest: ``Item`` (one video and question), ``load_manifest`` (CSV or JSONL, the VANS column names
understood), ``item_id`` (the id of a row without one) and ``safe_name`` (an id as a file name)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# Manifest column -> accepted names (first found wins), VANS CSV names included.
COLUMNS = {
    "id": ("id", "item_id"),
    "video": ("video", "input_video", "input_video_path", "video_path"),
    "question": ("question", "ENG_Instruction", "instruction"),
    "ground_truth": ("ground_truth", "gt", "ENG_GT_Caption", "caption_gt", "caption"),  # caption: trainer JSONL
    "gt_video": ("gt_video", "output_video_path", "target_video"),
    "split": ("split", "task"),
    "seed": ("seed",),
}


@dataclass
class Item:
    id: str
    video: str
    question: str
    ground_truth: str | None = None
    gt_video: str | None = None
    split: str | None = None
    seed: int | None = None


def item_id(video: str, question: str) -> str:
    """Stable id of an item without one: 12 hex digits of sha1(video, question)."""
    return hashlib.sha1(f"{video}\n{question}".encode("utf-8")).hexdigest()[:12]


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"manifest {path} line {number} is not JSON ({exc.msg}); fix that line") from None
            if not isinstance(row, dict):
                raise InputError(f"manifest {path} line {number} is not a JSON object; write one object per line")
            rows.append(row)
        return rows
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig drops the VANS CSV's BOM
        return [dict(row) for row in csv.DictReader(f)]


def _pick(row: dict, name: str):
    for key in COLUMNS[name]:
        value = row.get(key)
        if value not in (None, ""):
            return value
    return None


def load_manifest(path: str | os.PathLike, *, resolve_videos: bool = True) -> list[Item]:
    """Items of a CSV or JSONL manifest (see the vans.batch package docstring for the columns). Ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; pass a CSV or JSONL file")
    items, seen = [], {}
    for number, row in enumerate(_read_rows(path), start=1):
        video, question = _pick(row, "video"), _pick(row, "question")
        if video is None or question is None:
            missing = "video" if video is None else "question"
            raise InputError(f"manifest {path} row {number} has no {missing} (columns {', '.join(COLUMNS[missing])})")
        video, question = str(video), str(question)
        ident = str(_pick(row, "id") or item_id(video, question))
        if ident in seen:
            raise InputError(f"manifest {path} rows {seen[ident]} and {number} share the id {ident}; make ids unique")
        seen[ident] = number
        seed = _pick(row, "seed")
        try:
            seed = None if seed is None else int(seed)
        except ValueError:
            raise InputError(f"manifest {path} row {number} has seed {seed!r}; use an integer") from None
        gt_video = _pick(row, "gt_video")
        if resolve_videos:
            video = _resolve(path, video)
            gt_video = _resolve(path, gt_video) if gt_video else None
        items.append(Item(id=ident, video=video, question=question, ground_truth=_opt_str(_pick(row, "ground_truth")),
                          gt_video=gt_video, split=_opt_str(_pick(row, "split")), seed=seed))
    if not items:
        raise InputError(f"manifest {path} has no rows; add one row per video and question")
    return items


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


def _resolve(manifest: Path, video: str) -> str:
    p = Path(video)
    return str(p if p.is_absolute() else (manifest.parent / p).resolve())


def safe_name(ident: str) -> str:
    """A file-name-safe form of an id; ids that had to change get a hash so two never collide."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", ident)[:80]
    return clean if clean == ident else f"{clean}_{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
