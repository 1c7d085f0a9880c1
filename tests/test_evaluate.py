"""``vans.evaluate`` and ``vans.i3d``: caption metrics on hand-computed cases, the Fréchet distance against
closed forms and an independent matrix square root, the Inception-3D network and its loading, CLIP/FVD on tiny
random-weight models, clean skips, and the Table 1 layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vans.errors import InputError, ModelFileError
from vans.evaluate import METRICS, EvalSettings, evaluate, markdown_table
from vans.i3d import (I3D, POOLS, _max_pool_same, feature_stats, frechet_distance, fvd_from_features, load_i3d,
                      same_padding)

# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def test_frechet_one_dimensional_closed_form():
    # N(m1, s1²) vs N(m2, s2²): (m1 − m2)² + (s1 − s2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    x, y = np.array([[0.0], [2.0], [4.0]]), np.array([[1.0], [1.0], [4.0]])
    mu, cov = feature_stats(x)
    assert mu == pytest.approx([2.0]) and cov.tolist() == pytest.approx(np.array([[4.0]]))  # unbiased: (4 + 0 + 4) / 2
    # y: mean 2, variance (1 + 1 + 4) / 2 = 3
    assert fvd_from_features(x, y) == pytest.approx(0.0 + (2.0 - math.sqrt(3.0)) ** 2)


def test_frechet_diagonal_closed_form_and_identity():
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    expected = 1 + 4 + 0 + 0 + (1 - 2) ** 2 + (2 - 2) ** 2 + (3 - 1) ** 2
    assert frechet_distance([0, 0, 0], a, [1, 2, 0], b) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6))
    assert fvd_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(InputError, match="at least 2"):
        feature_stats(feats[:1])
    with pytest.raises(InputError, match="mismatched"):
        frechet_distance([0, 0], np.eye(2), [0, 0, 0], np.eye(3))


def denman_beavers_sqrt(m: np.ndarray, iterations: int = 60) -> np.ndarray:
    """Principal square root by the Denman–Beavers iteration (no eigendecomposition)."""
    y, z = m.astype(np.float64), np.eye(len(m))
    for _ in range(iterations):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def reference_frechet(mu1, s1, mu2, s2, sqrtm) -> float:
    root = sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(root)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_an_independent_matrix_square_root(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)) + 0.5
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(reference_frechet(mu1, s1, mu2, s2, denman_beavers_sqrt), rel=1e-7)


def test_frechet_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    mu1, s1 = feature_stats(rng.normal(size=(30, 4)))
    mu2, s2 = feature_stats(rng.normal(size=(30, 4)) * 2 + 1)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(reference_frechet(mu1, s1, mu2, s2, scipy_linalg.sqrtm), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# I3D
# ---------------------------------------------------------------------------------------------


def test_same_padding_like_tensorflow():
    assert same_padding(224, 7, 2) == (2, 3)  # out 112: (112 − 1)·2 + 7 − 224 = 5
    assert same_padding(16, 7, 2) == (2, 3)
    assert same_padding(56, 3, 1) == (1, 1)
    assert same_padding(15, 3, 2) == (1, 1)  # odd size: out 8, (8 − 1)·2 + 3 − 15 = 2
    assert same_padding(8, 1, 1) == (0, 0)


def test_standard_network_shapes():
    model = I3D().eval()
    assert model.feature_dim == 1024 and model.logits.conv3d.out_channels == 400
    assert model.Mixed_4f.out_channels == 832 and model.Mixed_3c.out_channels == 480
    x = torch.zeros(1, 3, 16, 112, 112)
    with torch.no_grad():
        for name in model.order:
            if name in POOLS:
                x = _max_pool_same(x, *POOLS[name])
            x = getattr(model, name)(x)
    assert tuple(x.shape) == (1, 1024, 2, 4, 4)  # 224×224 input gives 7×7


@pytest.fixture(scope="module")
def tiny_i3d_file(tmp_path_factory):
    from vans.fixtures.i3d import write_tiny_i3d

    return write_tiny_i3d(tmp_path_factory.mktemp("i3d") / "i3d.safetensors")


def test_tiny_i3d_loads_and_pools_like_the_reference_head(tiny_i3d_file):
    from vans.fixtures.i3d import TINY_I3D_CLASSES

    model = load_i3d(tiny_i3d_file)
    from vans.video import synthetic_frames

    videos = [synthetic_frames(16, 40, 56, seed=s) for s in range(3)]
    feats = model.features(videos, size=64)
    assert feats.shape == (3, TINY_I3D_CLASSES) and feats.dtype == torch.float64
    assert torch.equal(load_i3d(tiny_i3d_file).features(videos, size=64), feats)  # deterministic
    assert (feats[0] - feats[1]).abs().max() > 1e-3  # different clips, different features
    # at 16×224×224 the head must equal AvgPool3d((2, 7, 7), stride 1) → logits conv → mean over time
    from vans.i3d import _prepare

    feats = model.features(videos[:1], size=224)
    x = _prepare(videos[0], 224)[None]
    with torch.no_grad():
        h = x
        for name in model.order:
            if name in POOLS:
                h = _max_pool_same(h, *POOLS[name])
            h = getattr(model, name)(h)
        assert h.shape[2:] == (2, 7, 7)
        reference = model.logits.conv3d(torch.nn.functional.avg_pool3d(h, (2, 7, 7), 1)).mean(dim=(2, 3, 4))
    assert torch.allclose(feats.float(), reference, atol=1e-4)
    assert model.features(videos, layer="pool", size=64).shape == (3, model.feature_dim)


def test_i3d_file_in_another_layout_is_refused(tmp_path, tiny_i3d_file):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_i3d_file))
    sd.pop("Mixed_4c.b1b.conv3d.weight")
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ModelFileError, match="Mixed_4c.b1b.conv3d.weight"):
        load_i3d(tmp_path / "cut.safetensors")
    with pytest.raises(ModelFileError, match="not found"):
        load_i3d(tmp_path / "none.safetensors")


# ---------------------------------------------------------------------------------------------
# Evaluation and the table
# ---------------------------------------------------------------------------------------------


def write_run(tmp_path, rows, truth, videos: bool = False):
    """A results.jsonl (as vans.batch writes it) and a ground-truth JSONL."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps(t) + "\n" for t in truth), encoding="utf-8")
    return out / "results.jsonl", gt


def row(ident, caption, status="ok", video=""):
    return {"id": ident, "question": "q", "input_video": "x", "caption": caption, "video": video,
            "status": status, "error": "" if status == "ok" else "boom", "seconds": 1.0}


def test_text_metrics_hand_computed_and_clean_skips(tmp_path):
    results, gt = write_run(tmp_path, [
        row("a", "The cat sat"), row("b", "He cuts the onion."), row("c", "anything", status="error")],
        [{"id": "a", "video": "a.mp4", "question": "q", "ground_truth": "the cat sat on the mat", "split": "procedural"},
         {"id": "b", "video": "b.mp4", "question": "q", "ground_truth": "he cuts the onion .", "split": "predictive"},
         {"id": "c", "video": "c.mp4", "question": "q", "ground_truth": "x", "split": "predictive"},
         {"id": "d", "video": "d.mp4", "question": "q", "ground_truth": "never run", "split": "predictive"}])
    messages = []
    table = evaluate([results], ["mine"], gt, EvalSettings(clip=None, i3d=str(tmp_path / "absent.safetensors")),
                     log=messages.append)
    proc = table["splits"]["procedural"]["mine"]["metrics"]
    # 3 tokens vs 6: p1 = p2 = p3 = 1, no 4-gram, brevity penalty e^(1 − 6/3)
    assert proc["B@1"] == pytest.approx(math.exp(-1)) and proc["B@3"] == pytest.approx(math.exp(-1))
    assert proc["B@4"] == 0.0
    assert proc["R-L"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # LCS 3: precision 1, recall 1/2
    pred = table["splits"]["predictive"]["mine"]
    assert pred["count"] == 1 and all(pred["metrics"][m] == pytest.approx(1.0) for m in ("B@1", "B@4", "R-L"))
    assert all(pred["metrics"][m] is None for m in ("FVD", "CLIP-V", "CLIP-T"))
    assert table["left_out"]["mine"] == {"not_ok": 1, "no_ground_truth": 0, "missing": 1}
    assert table["skipped"]["mine"]["procedural"]["CLIP-V"] == "no CLIP file (pass --clip)"
    assert "not found" in table["skipped"]["mine"]["procedural"]["FVD"]
    assert any("FVD skipped" in m for m in messages) and any("CLIP-V, CLIP-T skipped" in m for m in messages)
    assert table["items"]["mine"]["a"]["R-L"] == pytest.approx(2 / 3)
    md = markdown_table(table)
    assert "**Table 1 — Procedural**" in md and "**Table 1 — Predictive**" in md
    assert "| Model | B@1 | B@2 | B@3 | B@4 | R-L | FVD | CLIP-V | CLIP-T | n |" in md
    assert "| mine | 0.3679 | 0.3679 | 0.3679 | 0.0000 | 0.6667 | – | – | – | 1 |" in md
    assert "FVD skipped" in md and "left out 1 not ok" in md
    assert "ROUGE-L: rouge-score rougeL F-measure (beta 1, LCS over the whole text), Porter stemmer" in md
    assert table["settings"]["rouge_l"].startswith("rouge-score rougeL")


def test_vans_csv_ground_truth_matches_by_id(tmp_path):
    from vans.batch import item_id

    csv_path = tmp_path / "vans.csv"
    csv_path.write_text("\ufeffoutput_video_path,input_video_path,ENG_Instruction,ENG_Think,ENG_GT_Caption\n"
                        "gt/1.mp4,in/1.mp4,What next?,t,She pours the milk.\n", encoding="utf-8")
    ident = item_id("in/1.mp4", "What next?")
    results, _ = write_run(tmp_path, [row(ident, "She pours the milk.")], [])
    table = evaluate([results], ["r"], csv_path, EvalSettings(), log=lambda _: None)
    assert table["splits"]["all"]["r"]["metrics"]["B@1"] == pytest.approx(1.0)


def test_clip_and_fvd_on_tiny_models_match_direct_computation(tmp_path, tiny_i3d_file):
    from vans.clip import load_clip
    from vans.fixtures.clip import write_tiny_clip
    from vans.video import FramePick, read_clip, read_video, sample_indices, synthetic_frames, write_video

    clip_file = write_tiny_clip(tmp_path / "clip.safetensors")
    rows, truth = [], []
    (tmp_path / "run" / "videos").mkdir(parents=True)
    for i in range(3):
        write_video(tmp_path / "run" / "videos" / f"{i}.mp4", synthetic_frames(9, 32, 48, seed=i), 8.0)
        write_video(tmp_path / f"gt{i}.mp4", synthetic_frames(13, 32, 48, seed=10 + i), 8.0)
        rows.append(row(str(i), f"caption {i}", video=f"videos/{i}.mp4"))
        truth.append({"id": str(i), "video": f"in{i}.mp4", "question": "q", "ground_truth": f"truth {i}",
                      "gt_video": f"gt{i}.mp4"})
    (tmp_path / "run" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps(t) + "\n" for t in truth))
    settings = EvalSettings(clip=str(clip_file), i3d=str(tiny_i3d_file), fvd_frames=8, fvd_size=32)
    table = evaluate([tmp_path / "run" / "results.jsonl"], ["tiny"], gt, settings, log=lambda _: None)
    metrics = table["splits"]["all"]["tiny"]["metrics"]
    assert table["skipped"]["tiny"]["all"] == {}
    # direct computation with the same engine pieces
    scorer = load_clip(clip_file)
    gen = [read_video(tmp_path / "run" / "videos" / f"{i}.mp4").frames for i in range(3)]
    # the GT clip as the training rewards see it: the answer's frame count, picked at 11 fps, cropped to its size
    gts = [read_clip(tmp_path / f"gt{i}.mp4", g.shape[0], g.shape[1], g.shape[2], FramePick("fps", 11.0)).frames
           for i, g in enumerate(gen)]
    clip_v = [scorer.clip_v(g, t) for g, t in zip(gen, gts)]
    clip_t = [scorer.clip_t(g, f"truth {i}") for i, g in enumerate(gen)]
    assert metrics["CLIP-V"] == pytest.approx(sum(clip_v) / 3, abs=1e-5)
    assert metrics["CLIP-T"] == pytest.approx(sum(clip_t) / 3, abs=1e-5)
    i3d = load_i3d(tiny_i3d_file)
    gen8 = [read_video(tmp_path / "run" / "videos" / f"{i}.mp4", num_frames=8).frames for i in range(3)]
    # the GT span the answer stands for (as CLIP-V: its frame count at 11 fps, its size), 8 frames spread over it
    gt8 = [g[sample_indices(g.shape[0], 8)] for g in gts]
    expected = fvd_from_features(i3d.features(gen8, size=32), i3d.features(gt8, size=32))
    assert metrics["FVD"] == pytest.approx(expected, rel=1e-6) and metrics["FVD"] > 0
    assert set(table["items"]["tiny"]["0"]) >= {"B@1", "R-L", "CLIP-V", "CLIP-T"}


def test_command_line_writes_the_table(tmp_path, capsys):
    from vans.__main__ import main

    results, gt = write_run(tmp_path, [row("a", "he cuts the onion")],
                            [{"id": "a", "video": "a.mp4", "question": "q", "ground_truth": "he cuts the onion"}])
    rc = main(["eval", str(results), "--gt", str(gt), "--out", str(tmp_path / "eval"), "--name", "VANS (ours)"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "| VANS (ours) | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | – | – | – | 1 |" in captured.out
    table = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert list(table["splits"]["all"]["VANS (ours)"]["metrics"]) == list(METRICS)
    assert (tmp_path / "eval" / "table.md").read_text() == captured.out.rstrip("\n") + "\n"
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "eval" / "scores.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in captured.err
    rc = main(["eval", str(tmp_path / "nope.jsonl"), "--gt", str(gt), "--out", str(tmp_path / "e2")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
