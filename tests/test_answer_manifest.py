"""``python -m vans answer --manifest``: a manifest answered in this process, in the output layout of
``vans batch`` (so ``vans eval`` reads it), resumable, one bad item failing alone. Tiny demo models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vans import progress
from vans.batch import DONE, FAILED, load_manifest, read_results
from vans.batch.local import answer_manifest
from vans.fixtures import write_demo_inputs, write_demo_models
from vans.models import resolve_models
from vans.pipeline import AnswerSettings, load_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = resolve_models(write_demo_models(tmp_path_factory.mktemp("models")))
    return load_models(paths, device=torch.device("cpu"), dtype=torch.float32)


def _settings() -> AnswerSettings:
    s = AnswerSettings(seed=0)
    s.video.width, s.video.height, s.video.num_frames, s.video.steps, s.video.num_context = 64, 48, 9, 2, 2
    s.caption.max_new_tokens, s.caption.min_pixels, s.caption.max_pixels = 8, 56 * 56, 112 * 112
    return s


def _manifest(tmp_path: Path) -> Path:
    clip = write_demo_inputs(tmp_path / "clip.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    rows = [{"id": "a", "video": clip.name, "question": "What happens next?", "ground_truth": "the fox jumps"},
            {"id": "bad", "video": "broken.mp4", "question": "What happens next?"},
            {"id": "c", "video": clip.name, "question": "And then?", "seed": 7}]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_manifest_answers_in_batch_layout_resumes_and_fails_bad_items_alone(models, tmp_path, monkeypatch):
    items = load_manifest(_manifest(tmp_path))
    out = tmp_path / "out"
    with progress.quiet():
        counts = answer_manifest(models, items, out, _settings(), stream=None)
    assert counts == {DONE: 2, FAILED: 1}
    records = {r["id"]: r for r in read_results(out / "results.jsonl")}
    assert list(records) == ["a", "bad", "c"]  # manifest order
    assert "could not be opened as a video" in records["bad"]["error"] and records["bad"]["video"] == ""
    for ident in ("a", "c"):
        assert records[ident]["caption"] and (out / records[ident]["video"]).is_file()
    assert records["a"]["ground_truth"] == "the fox jumps" and (records["a"]["seed"], records["c"]["seed"]) == (0, 7)

    # a rerun does nothing for finished items; --retry-failed retries only the failed one
    calls = []
    import vans.pipeline as pipeline

    real = pipeline.answer
    monkeypatch.setattr(pipeline, "answer", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert answer_manifest(models, items, out, _settings(), stream=None) == counts and calls == []
    answer_manifest(models, items, out, _settings(), stream=None, retry_failed=True)
    assert calls == [items[1].video]


def test_eval_reads_a_local_run(models, tmp_path):
    from vans.evaluate import match

    manifest = _manifest(tmp_path)
    items = load_manifest(manifest)
    with progress.quiet():
        answer_manifest(models, items, tmp_path / "out", _settings(), stream=None)
    pairs, left_out = match(tmp_path / "out" / "results.jsonl", items)
    assert [p.id for p in pairs] == ["a"] and pairs[0].video.is_file()  # only "a" has a ground truth
    assert left_out["no_ground_truth"] == 2


def test_cli_manifest_then_eval(tmp_path):
    import subprocess
    import sys

    manifest = _manifest(tmp_path)
    root = Path(__file__).resolve().parents[1]
    small = ["--width", "64", "--height", "48", "--frames", "9", "--steps", "2", "--context", "2",
             "--max-new-tokens", "8"]
    run = subprocess.run([sys.executable, "-m", "vans", "answer", "--demo", "--manifest", str(manifest), "--out",
                          str(tmp_path / "out"), "--quiet", *small], cwd=root, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr  # one bad item
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["error"]) == (2, 1)
    assert not (tmp_path / "out" / "answer.json").exists()  # the single-answer files are not written
    both = subprocess.run([sys.executable, "-m", "vans", "answer", "--manifest", str(manifest), "--video", "x.mp4",
                           "--out", str(tmp_path / "o2")], cwd=root, capture_output=True, text=True)
    assert both.returncode == 2 and "drop --video and --question" in both.stderr
    ev = subprocess.run([sys.executable, "-m", "vans", "eval", str(tmp_path / "out" / "results.jsonl"), "--gt",
                         str(manifest), "--out", str(tmp_path / "eval")], cwd=root, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    table = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert "R-L" in json.dumps(table)
