"""Datasets (VANS CSV, JSONL) with bad rows skipped and counted; the content-keyed feature cache."""

import csv
import json

import pytest
import torch

from trainer.data import FeatureCache, load_samples, write_demo_dataset
from vans.errors import InputError


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("csvdata"), count=3, fmt="csv")


def _rewrite_csv(path, rows_extra=(), drop_column=None):
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.extend(rows_extra)
    columns = [c for c in rows[0] if c != drop_column]
    out = path.with_name("edited.csv")
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_csv_layout_is_read(csv_dataset):
    report = load_samples(csv_dataset)
    assert len(report.samples) == 3 and report.skipped == []
    s = report.samples[0]
    assert s.id == "s0" and s.question == "What will happen next?" and s.think.startswith("The video")
    assert s.caption and s.video.endswith("in_0.mp4") and s.gt_video.endswith("gt_0.mp4")


def test_corrupt_and_missing_videos_are_skipped_with_reasons(csv_dataset):
    corrupt = csv_dataset.parent / "videos" / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 definitely not a video" * 50)
    good = {"input_video_path": "videos/in_0.mp4", "output_video_path": "videos/gt_0.mp4",
            "ENG_Instruction": "q", "ENG_Think": "", "ENG_GT_Caption": "c"}
    extra = [dict(good, id="bad1", input_video_path="videos/corrupt.mp4"),
             dict(good, id="bad2", output_video_path="videos/missing.mp4"),
             dict(good, id="bad3", ENG_GT_Caption="")]
    report = load_samples(_rewrite_csv(csv_dataset, extra))
    assert len(report.samples) == 3 and len(report.skipped) == 3
    reasons = " | ".join(r for _, r in report.skipped)
    assert "corrupt.mp4" in reasons and "missing.mp4" in reasons and "caption" in reasons
    assert "3 rows skipped" in report.summary()


def test_missing_column_names_it(csv_dataset):
    with pytest.raises(InputError, match="ENG_GT_Caption"):
        load_samples(_rewrite_csv(csv_dataset, drop_column="ENG_GT_Caption"))


def test_empty_dataset_and_nothing_usable(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="no rows"):
        load_samples(empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("input_video_path,output_video_path,ENG_Instruction,ENG_GT_Caption\n", encoding="utf-8")
    with pytest.raises(InputError, match="no rows"):
        load_samples(header_only)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "x.mp4", "question": "q", "caption": "c", "gt_video": "y.mp4"}) + "\n{oops\n")
    with pytest.raises(InputError, match="no usable sample.*2 rows skipped"):
        load_samples(bad)
    with pytest.raises(InputError, match="not found"):
        load_samples(tmp_path / "nope.csv")


def test_jsonl_and_video_root(tmp_path):
    path = write_demo_dataset(tmp_path / "d", count=2)
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(InputError, match="no usable sample"):  # relative paths now point nowhere
        load_samples(moved)
    report = load_samples(moved, video_root=path.parent, max_samples=1)
    assert len(report.samples) == 1 and report.samples[0].id == "s0"


def test_feature_cache_computes_once_and_keys_by_content(tmp_path):
    video = tmp_path / "v.bin"
    video.write_bytes(b"first")
    calls = []

    def compute():
        calls.append(1)
        return {"a": torch.full((2,), float(len(calls)))}

    cache = FeatureCache(tmp_path / "cache")
    first = cache.get_or_compute("ctx", (video, 32, "fp32"), compute)
    again = FeatureCache(tmp_path / "cache").get_or_compute("ctx", (video, 32, "fp32"), compute)  # from disk
    assert len(calls) == 1 and torch.equal(first["a"], again["a"])
    assert FeatureCache(tmp_path / "cache").get_or_compute("ctx", (video, 64, "fp32"), compute)["a"][0] == 2
    renamed = tmp_path / "renamed.bin"
    renamed.write_bytes(b"first")  # same content, other name: a hit
    assert cache.get_or_compute("ctx", (renamed, 32, "fp32"), compute)["a"][0] == 1
    video.write_bytes(b"second")  # new content: recomputed
    assert FeatureCache(tmp_path / "cache").get_or_compute("ctx", (video, 32, "fp32"), compute)["a"][0] == 3
    single = cache.get_or_compute("t", ("text",), lambda: torch.ones(3))
    assert isinstance(single, torch.Tensor) and FeatureCache(tmp_path / "cache").get_or_compute(
        "t", ("text",), lambda: torch.zeros(3)).sum() == 3


def test_memory_caches_are_bounded_lrus(tmp_path):
    from vans.cache import LRUCache

    lru = LRUCache(2)
    lru.put("a", 1), lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recent
    lru.put("c", 3)
    assert len(lru) == 2 and "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3
    with pytest.raises(InputError, match="at least 1"):
        LRUCache(0)
    calls = []

    def compute(n):
        return lambda: calls.append(n) or torch.full((2,), float(n))

    cache = FeatureCache(None, memory_entries=2)
    for n in (1, 2, 3):
        cache.get_or_compute("x", [n], compute(n))
    assert len(cache._memory) == 2
    assert cache.get_or_compute("x", [3], compute(3))[0] == 3 and calls == [1, 2, 3]  # kept
    assert cache.get_or_compute("x", [1], compute(1))[0] == 1 and calls == [1, 2, 3, 1]  # evicted: recomputed


def test_unset_and_missing_dataset_paths_name_the_setting(tmp_path):
    with pytest.raises(InputError, match="data.path is not set; pass --set data.path="):
        load_samples("")
    with pytest.raises(InputError, match="dataset file not found: .*nope.csv"):
        load_samples(tmp_path / "nope.csv")


def test_split_column_and_seeded_fraction(tmp_path):
    from trainer.data import split_samples

    path = write_demo_dataset(tmp_path / "d", count=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["split"], rows[4]["split"], rows[5]["split"] = "val", "Test", "bogus"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = load_samples(path)
    assert [why for _, why in report.skipped] == ["split 'bogus' is not known; use train or one of val, valid, "
                                                  "validation, test, heldout"]
    train, held = split_samples(report.samples, fraction=0.5, seed=3)  # the column wins over the fraction
    assert [s.id for s in held] == [report.samples[1].id, report.samples[4].id]
    assert len(train) == 3 and not set(map(id, train)) & set(map(id, held))

    unmarked = load_samples(write_demo_dataset(tmp_path / "e", count=8)).samples
    a, b = split_samples(unmarked, fraction=0.25, seed=1)
    assert len(b) == 2 and len(a) == 6
    assert [s.id for s in split_samples(unmarked, fraction=0.25, seed=1)[1]] == [s.id for s in b]  # pure function
    draws = {tuple(s.id for s in split_samples(unmarked, fraction=0.25, seed=k)[1]) for k in range(6)}
    assert len(draws) > 1  # the seed matters
    assert split_samples(unmarked, fraction=0.0) == (unmarked, [])
    assert len(split_samples(unmarked[:2], fraction=0.9)[0]) == 1  # always one row left to train on
    with pytest.raises(InputError, match="heldout_fraction"):
        split_samples(unmarked, fraction=1.0)


def test_held_out_rows_do_not_depend_on_where_the_dataset_lives(tmp_path):
    import shutil

    from trainer.data import split_samples

    first = write_demo_dataset(tmp_path / "here", count=8)
    shutil.copytree(tmp_path / "here", tmp_path / "moved" / "elsewhere")
    moved = tmp_path / "moved" / "elsewhere" / first.name
    held = [s.id for s in split_samples(load_samples(first).samples, fraction=0.25, seed=2)[1]]
    assert held == [s.id for s in split_samples(load_samples(moved).samples, fraction=0.25, seed=2)[1]]
