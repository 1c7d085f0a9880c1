"""Training data: the VANS CSV / JSONL datasets and a content-keyed feature cache.

Formats (one row = one sample):

* CSV (the released VANS layout): ``input_video_path``, ``output_video_path``, ``ENG_Instruction``,
  ``ENG_GT_Caption`` are required; ``ENG_Think``, ``id`` and ``split`` are optional; other columns are ignored.
* JSONL: one object per line with ``video``, ``question``, ``caption``, ``gt_video`` (required) and
  ``think``, ``id``, ``split`` (optional).

``split`` (``train``, or ``val`` / ``valid`` / ``validation`` / ``test`` / ``heldout``) puts a row in the
held-out set of the SFT stages (``split_samples``); rows without it are training rows, or are drawn into
the held-out set by a seeded fraction.

Relative video paths are resolved against ``video_root`` (default: the dataset file's folder). A row
with an empty field, a missing file or a video that cannot be opened is reported in
``DatasetReport.skipped`` with the reason and left out; it never stops the run. A file without a
required column, or with no usable row at all, raises ``InputError``.

``FeatureCache`` stores per-sample tensors that do not change during training (context latents,
ground-truth CLIP features, embeddings of fixed texts) as safetensors files named by a sha256 of the
kind, the content hash of every input file and the settings; a changed video or setting gives a new
key, never a stale hit. Files are written atomically, so processes may share one cache folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from vans.cache import LRUCache
from vans.errors import InputError

log = logging.getLogger("vans.trainer")

CSV_COLUMNS = {  # our name -> VANS CSV column
    "video": "input_video_path",
    "gt_video": "output_video_path",
    "question": "ENG_Instruction",
    "caption": "ENG_GT_Caption",
}
CSV_OPTIONAL = {"think": "ENG_Think", "id": "id", "split": "split"}
HELDOUT_SPLITS = ("val", "valid", "validation", "test", "heldout")
JSONL_REQUIRED = ("video", "question", "caption", "gt_video")


@dataclass
class Sample:
    id: str
    video: str  # absolute path of the input clip
    question: str
    think: str
    caption: str  # ground-truth caption of the next event
    gt_video: str  # absolute path of the ground-truth next-event clip
    split: str = ""  # "" or "train": a training row; one of HELDOUT_SPLITS: held out


@dataclass
class DatasetReport:
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row label, reason)

    def summary(self) -> str:
        text = f"{len(self.samples)} samples, {len(self.skipped)} rows skipped"
        if self.skipped:
            text += " (e.g. " + "; ".join(f"{row}: {why}" for row, why in self.skipped[:3]) + ")"
        return text


# ----------------------------------------------------------------------------------------------------
# Reading rows


def _csv_rows(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise InputError(f"dataset {path} is empty; it needs a header row and at least one sample")
        missing = [c for c in CSV_COLUMNS.values() if c not in header]
        if missing:
            raise InputError(f"dataset {path} lacks the column(s) {', '.join(missing)}; "
                             f"the VANS CSV needs {', '.join(CSV_COLUMNS.values())}")
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "") for k, v in row.items()}
            out = {ours: row.get(col, "") for ours, col in CSV_COLUMNS.items()}
            out.update({ours: row.get(col, "") for ours, col in CSV_OPTIONAL.items()})
            yield f"line {line}", out


def _jsonl_rows(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield f"line {line}", {"_error": f"not valid JSON ({exc.msg})"}
                continue
            if not isinstance(row, dict):
                yield f"line {line}", {"_error": "not a JSON object"}
                continue
            yield f"line {line}", row


def _resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _video_problem(path: Path, what: str, check: bool) -> str | None:
    if not path.is_file():
        return f"{what} not found: {path}"
    if not check:
        return None
    from vans.video import probe

    try:
        probe(path, what=what)
    except InputError as exc:
        return str(exc)
    return None


def _make_sample(label: str, row: dict, root: Path, check: bool) -> tuple[Sample | None, str | None]:
    if "_error" in row:
        return None, row["_error"]
    missing = [k for k in JSONL_REQUIRED if not str(row.get(k) or "").strip()]
    if missing:
        return None, f"empty or missing field(s) {', '.join(missing)}"
    video, gt_video = _resolve(str(row["video"]), root), _resolve(str(row["gt_video"]), root)
    for path, what in ((video, "input video"), (gt_video, "ground-truth video")):
        problem = _video_problem(path, what, check)
        if problem:
            return None, problem
    sample = Sample(id=str(row.get("id") or "").strip() or label.replace(" ", ""), video=str(video),
                    question=str(row["question"]).strip(), think=str(row.get("think") or "").strip(),
                    caption=str(row["caption"]).strip(), gt_video=str(gt_video),
                    split=str(row.get("split") or "").strip().lower())
    if sample.split not in ("", "train") + HELDOUT_SPLITS:
        return None, f"split '{sample.split}' is not known; use train or one of {', '.join(HELDOUT_SPLITS)}"
    return sample, None


def load_samples(path: str | os.PathLike, video_root: str | os.PathLike | None = None, *,
                 check_videos: bool = True, max_samples: int = 0) -> DatasetReport:
    """Read a VANS CSV or JSONL dataset; bad rows are skipped and listed, never fatal."""
    if not str(path).strip():
        raise InputError("data.path is not set; pass --set data.path=<VANS .csv or .jsonl> (python -m trainer.data "
                         "--demo DIR writes a tiny one)")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset file not found: {path}; set data.path to a VANS .csv or .jsonl file")
    root = Path(video_root) if video_root else path.parent
    rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".json") else _csv_rows(path)
    report = DatasetReport(samples=[])
    seen = 0
    for label, row in rows:
        seen += 1
        sample, reason = _make_sample(label, row, root, check_videos)
        if sample is None:
            report.skipped.append((label, reason))
            log.warning("dataset %s %s skipped: %s", path.name, label, reason)
        else:
            report.samples.append(sample)
            if max_samples and len(report.samples) >= max_samples:
                break
    if seen == 0:
        raise InputError(f"dataset {path} has no rows; add at least one sample")
    if not report.samples:
        raise InputError(f"dataset {path} has no usable sample: {report.summary()}; fix the paths or video_root")
    if report.skipped:
        log.warning("dataset %s: %s", path.name, report.summary())
    return report


def split_samples(samples: list[Sample], fraction: float = 0.0, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out). Rows whose ``split`` names a held-out set are held out; if none does, a seeded
    ``fraction`` of the rows is drawn instead (at least one, and at least one row left to train on).
    The draw is a pure function of (the sample ids and video file names, seed), so every process and every
    resume agree, and moving the dataset folder keeps the same rows held out."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"data.heldout_fraction is {fraction}; use a value in [0, 1)")
    marked = [s for s in samples if s.split in HELDOUT_SPLITS]
    if marked:
        train = [s for s in samples if s.split not in HELDOUT_SPLITS]
    elif fraction > 0 and len(samples) > 1:
        count = min(len(samples) - 1, max(1, round(fraction * len(samples))))
        ranked = sorted(samples, key=lambda s: hashlib.sha256(f"{seed}:{s.id}:{Path(s.video).name}".encode()).hexdigest())
        held = {id(s) for s in ranked[:count]}
        marked = [s for s in samples if id(s) in held]
        train = [s for s in samples if id(s) not in held]
    else:
        return list(samples), []
    if not train:
        raise InputError("every row of the dataset is held out (split column); mark some rows split=train")
    return train, marked


# ----------------------------------------------------------------------------------------------------
# Feature cache


def file_digest(path: str | os.PathLike, _memo: dict = {}) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime within the process)."""
    p = Path(path)
    stat = p.stat()
    memo_key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _memo:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _memo[memo_key] = h.hexdigest()
    return _memo[memo_key]


def cache_key(kind: str, key_parts: Iterable) -> str:
    """sha256 over the kind and the parts; a ``Path`` part contributes its content hash, not its name."""
    h = hashlib.sha256(kind.encode())
    for part in key_parts:
        text = f"file:{file_digest(part)}" if isinstance(part, Path) else f"{type(part).__name__}:{part!r}"
        h.update(b"\0" + text.encode())
    return h.hexdigest()


class FeatureCache:
    """``get_or_compute(kind, key_parts, fn)``: the cached tensor(s), or ``fn()`` computed once and stored.

    ``fn`` returns a tensor or a dict of tensors; the same type comes back. ``hits`` / ``misses`` count
    lookups in this process. The last ``memory_entries`` values are also kept in memory (an LRU); older
    ones are read back from disk (or recomputed when there is no folder).
    """

    def __init__(self, directory: str | os.PathLike | None, memory_entries: int = 256):
        self.dir = Path(directory) if directory else None
        self.hits = 0
        self.misses = 0
        self._memory = LRUCache(memory_entries)

    def path_for(self, kind: str, key: str) -> Path:
        return self.dir / kind / f"{key}.safetensors"

    def get_or_compute(self, kind: str, key_parts: Iterable, fn: Callable[[], torch.Tensor | dict]):
        key = cache_key(kind, list(key_parts))
        value = self._memory.get(key)
        if value is not None:
            self.hits += 1
            return value
        value = self._read(kind, key)
        if value is None:
            self.misses += 1
            value = fn()
            self._write(kind, key, value)
        else:
            self.hits += 1
        return self._memory.put(key, value)

    def _read(self, kind: str, key: str):
        if self.dir is None:
            return None
        path = self.path_for(kind, key)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            log.warning("feature cache file %s is unreadable; recomputing it", path)
            return None
        return tensors["value"] if set(tensors) == {"value"} else tensors

    def _write(self, kind: str, key: str, value) -> None:
        if self.dir is None:
            return
        from vans.checkpoints import save_state_dict

        tensors = value if isinstance(value, dict) else {"value": value}
        save_state_dict(tensors, self.path_for(kind, key))


# ----------------------------------------------------------------------------------------------------
# A tiny synthetic dataset (tests, CPU demo)

DEMO_CAPTIONS = ("the quick brown fox jumps over the lazy dog", "a hand sprinkles cheese over the chicken",
                 "the man will sit down", "she gets burned in a movie")


def write_demo_dataset(folder: str | os.PathLike, count: int = 4, *, frames: int = 9, size: tuple[int, int] = (32, 32),
                       captions: Iterable[str] | None = None, fmt: str = "jsonl") -> Path:
    """``count`` synthetic input/next-event clip pairs + a VANS ``train.csv`` or ``train.jsonl``; returns the file."""
    from vans.video import synthetic_frames, write_video

    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    captions = list(captions or DEMO_CAPTIONS)
    rows = []
    for i in range(count):
        clip = synthetic_frames(2 * frames, *size, seed=i)
        write_video(folder / "videos" / f"in_{i}.mp4", clip[:frames], 8.0)
        write_video(folder / "videos" / f"gt_{i}.mp4", clip[frames:], 8.0)
        rows.append({"id": f"s{i}", "video": f"videos/in_{i}.mp4", "question": "What will happen next?",
                     "think": "The video shows moving shapes.", "caption": captions[i % len(captions)],
                     "gt_video": f"videos/gt_{i}.mp4"})
    if fmt == "jsonl":
        path = folder / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    path = folder / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "input_video_path", "output_video_path", "ENG_Instruction", "ENG_Think", "ENG_GT_Caption"])
        for r in rows:
            writer.writerow([r["id"], r["video"], r["gt_video"], r["question"], r["think"], r["caption"]])
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.data", description="Check a dataset or write a demo one.")
    parser.add_argument("--demo", metavar="DIR", help="write a tiny synthetic dataset (train.jsonl + videos) into DIR")
    parser.add_argument("--check", metavar="FILE", help="read a VANS CSV/JSONL and report usable and skipped rows")
    parser.add_argument("--video-root", default=None)
    args = parser.parse_args()
    if args.demo:
        print(write_demo_dataset(args.demo))
    if args.check:
        print(load_samples(args.check, args.video_root).summary())


def vae_tiling_key(vae) -> tuple:
    """What of the VAE's tiling changes its latents: part of every cached-latent key."""
    return (bool(getattr(vae, "tiling", False)), tuple(getattr(vae, "tile_size", ())),
            tuple(getattr(vae, "tile_stride", ())))


def frame_pick(section, name: str):
    """The ``vans.video.FramePick`` of a config section with ``frame_pick`` / ``pick_fps``; errors name the keys."""
    from vans.video import FramePick

    pick = FramePick(section.frame_pick, section.pick_fps)
    try:
        pick.validate()
    except InputError as exc:
        raise InputError(f"{name}.{exc}") from None
    return pick
