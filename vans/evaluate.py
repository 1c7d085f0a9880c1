"""The VANS Table 1 metrics of a batch run: ``python -m vans eval RESULTS.jsonl --gt GT.csv --out DIR``.

Inputs: one or more ``results.jsonl`` of ``python -m vans batch`` (each a row of the table, named with
``--name`` or after its folder) and the ground truth: the VANS CSV (``input_video_path``,
``output_video_path``, ``ENG_Instruction``, ``ENG_GT_Caption``) or a JSONL/CSV with the manifest columns of
``vans.batch`` (``ground_truth``, ``gt_video``, optional ``split``). Predictions are matched to the ground
truth by id (the batch derives missing ids the same way), else by (input video, question).

Metrics (paper Sec. 5.1; it leaves tokenisation and averaging open, the choices are ours):

* BLEU@1–4: corpus-level cumulative BLEU (``vans.rewards.corpus_bleu``); the per-item plot uses sentence BLEU;
* ROUGE-L: mean of the per-item F-measure (``vans.rewards.rouge_l``);
* CLIP-V / CLIP-T: ``vans.clip.ClipScorer`` (``--clip``, open_clip ViT-B/32 safetensors; ``--clip-arch``, OpenAI's
  QuickGELU model by default), per item, averaged. CLIP-V reads the GT clip exactly as both training rewards do
  (``vans.video.read_clip``: the answer's frame count, ``--frame-pick``, cropped to the answer's size);
  CLIP-T scores the generated frames against the GT caption (``--clip-t-text pred`` for the predicted one);
* FVD: Fréchet distance of I3D features of the generated vs the GT clips (``--i3d``, a user-provided
  safetensors file; ``vans.i3d``), each clip resampled to ``--fvd-frames`` frames (default 16) at 224×224.

A metric whose model file is not given or missing, or that lacks its inputs (no GT videos, fewer than two
pairs for FVD), is skipped and the table says why. Items that did not finish (status other than ``ok``)
are left out and counted.

Outputs in ``--out``: ``table.md`` (Table 1 layout, one section per split), ``table.json`` (the same
numbers, the skip reasons, and every per-item score) and ``scores.png`` (per-item score distributions;
needs matplotlib, skipped with a message otherwise).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .batch import DONE, Item, load_manifest, read_results
from .errors import InputError
from .rewards import ROUGE_L_VARIANT

METRICS = ("B@1", "B@2", "B@3", "B@4", "R-L", "FVD", "CLIP-V", "CLIP-T")
DEFAULT_SPLIT = "all"


@dataclass
class Pair:
    """One finished prediction with its ground truth."""

    id: str
    split: str
    caption: str
    reference: str
    video: Path | None  # generated answer video
    gt_video: Path | None
    scores: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def match(results_path: Path, truth: list[Item]) -> tuple[list[Pair], dict]:
    """Finished predictions paired with their ground truth; counts of what was left out."""
    by_id = {item.id: item for item in truth}
    by_key = {(os.path.normpath(item.video), item.question): item for item in truth}
    pairs, left_out = [], {"not_ok": 0, "no_ground_truth": 0, "missing": 0}
    seen = set()
    for record in read_results(results_path):
        item = by_id.get(str(record.get("id"))) or by_key.get(
            (os.path.normpath(str(record.get("input_video", ""))), record.get("question")))
        if item is None or item.ground_truth is None:
            left_out["no_ground_truth"] += 1
            continue
        seen.add(item.id)
        if record.get("status") != DONE:
            left_out["not_ok"] += 1
            continue
        video = record.get("video")
        pairs.append(Pair(id=item.id, split=item.split or DEFAULT_SPLIT, caption=record.get("caption") or "",
                          reference=item.ground_truth, video=(results_path.parent / video) if video else None,
                          gt_video=Path(item.gt_video) if item.gt_video else None))
    left_out["missing"] = sum(1 for item in truth if item.id not in seen and item.ground_truth is not None)
    return pairs, left_out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def text_metrics(pairs: list[Pair]) -> dict:
    """BLEU@1–4 (corpus) and ROUGE-L (mean); per-item sentence BLEU and ROUGE-L go into ``pair.scores``."""
    from .rewards import bleu, corpus_bleu, rouge_l_batch

    preds, refs = [p.caption for p in pairs], [p.reference for p in pairs]
    corpus = corpus_bleu(preds, refs)
    rouge = rouge_l_batch(preds, refs)
    for pair, r in zip(pairs, rouge):
        pair.scores.update({f"B@{n}": s for n, s in enumerate(bleu(pair.caption, pair.reference), start=1)})
        pair.scores["R-L"] = r
    return {**{f"B@{n}": s for n, s in enumerate(corpus, start=1)}, "R-L": sum(rouge) / len(rouge)}


def _read(path: Path, num_frames: int | None = None, size: int | None = 448):
    """Frames of a video; ``size`` caps the longer side while decoding (never enlarges), None keeps it."""
    from .video import read_video

    return read_video(path, num_frames=num_frames, size=(size, size) if size else None, resize="fit",
                      what="video").frames


def _video_problem(pairs: list[Pair], need_gt: bool) -> str | None:
    if any(p.video is None or not p.video.is_file() for p in pairs):
        return "a generated video is missing"
    if need_gt and any(p.gt_video is None or not p.gt_video.is_file() for p in pairs):
        return "a ground-truth video is missing (gt_video / output_video_path)"
    return None


def gt_as_answer(gt_video: Path, answer_frames: int, height: int, width: int, pick=None):
    """The GT clip as the training rewards see it (``vans.video.read_clip``): the answer's frame count, picked by
    ``pick`` (default: 11 fps from the start), cropped to the answer's size. CLIP-V and FVD both use it."""
    from .video import read_clip

    return read_clip(gt_video, answer_frames, height, width, pick, what="ground-truth video").frames


def clip_metrics(pairs: list[Pair], scorer, text: str = "gt", pick=None) -> tuple[dict, dict]:
    """CLIP-V (needs GT videos) and CLIP-T, means over items; (values, skip reasons).

    CLIP-V compares each generated frame with the GT clip seen exactly as the training rewards see it
    (``vans.video.read_clip``): as many frames as the answer, picked by ``pick``, cropped to the answer's size."""
    from .video import read_video

    values, skipped = {}, {}
    problem = _video_problem(pairs, need_gt=False)
    if problem:
        return values, {"CLIP-V": problem, "CLIP-T": problem}
    gt_problem = _video_problem(pairs, need_gt=True)
    if gt_problem:
        skipped["CLIP-V"] = gt_problem
    for pair in pairs:
        frames = read_video(pair.video, what="generated video").frames
        if "CLIP-V" not in skipped:
            gt = gt_as_answer(pair.gt_video, frames.shape[0], frames.shape[1], frames.shape[2], pick)
            pair.scores["CLIP-V"] = scorer.clip_v(frames, gt)
        pair.scores["CLIP-T"] = scorer.clip_t(frames, pair.reference if text == "gt" else pair.caption)
    for name in ("CLIP-V", "CLIP-T"):
        if name not in skipped:
            values[name] = sum(p.scores[name] for p in pairs) / len(pairs)
    return values, skipped


def fvd_metric(pairs: list[Pair], model, frames: int = 16, size: int = 224, pick=None) -> tuple[float | None, str | None]:
    """FVD of the generated vs the GT clips (I3D features, ``vans.i3d``): ``frames`` spread over each answer and
    over the span of its GT clip that the answer stands for (``gt_as_answer``, as CLIP-V)."""
    from .i3d import fvd_from_features
    from .video import probe, sample_indices

    problem = _video_problem(pairs, need_gt=True)
    if problem:
        return None, problem
    if len(pairs) < 2:
        return None, f"FVD needs at least 2 videos per split (got {len(pairs)})"
    gen = model.features([_read(p.video, frames, None) for p in pairs], size=size)  # I3D resizes itself
    gts = []
    for p in pairs:
        info = probe(p.video, what="generated video")
        clip = gt_as_answer(p.gt_video, info.frames, info.height, info.width, pick)
        gts.append(clip[sample_indices(clip.shape[0], frames)])
    gt = model.features(gts, size=size)
    return fvd_from_features(gen, gt), None


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def _cell(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if name == "FVD" else f"{value:.4f}"


def markdown_table(table: dict) -> str:
    """``table.json`` content → Markdown in the layout of the paper's Table 1."""
    lines = []
    for split, rows in table["splits"].items():
        lines += [f"**Table 1 — {split.capitalize()}**", "",
                  "| Model | " + " | ".join(METRICS) + " | n |", "|---" * (len(METRICS) + 2) + "|"]
        for model, row in rows.items():
            lines.append(f"| {model} | " + " | ".join(_cell(m, row["metrics"].get(m)) for m in METRICS)
                         + f" | {row['count']} |")
        lines.append("")
    notes = [f"- {model} / {split}: {metric} skipped: {why}" for model, per_split in table["skipped"].items()
             for split, reasons in per_split.items() for metric, why in reasons.items()]
    notes += [f"- {model}: left out {n} {what.replace('_', ' ')} item(s)" for model, counts in table["left_out"].items()
              for what, n in counts.items() if n]
    if notes:
        lines += ["Notes:", *notes, ""]
    lines.append("BLEU: corpus-level cumulative BLEU@n; ROUGE-L, CLIP-V, CLIP-T: means over items "
                 f"(CLIP-T against the {table['settings']['clip_t_text']} caption); FVD lower is better.")
    lines.append(f"ROUGE-L: {table['settings'].get('rouge_l', ROUGE_L_VARIANT)}. "
                 f"CLIP: {table['settings'].get('clip_arch') or 'not run'}.")
    return "\n".join(lines) + "\n"


def plot_scores(table: dict, path: Path) -> str:
    """Per-item score distributions (one panel per metric, one box per model and split)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "scores.png skipped: matplotlib is not installed (pip install matplotlib)"
    names = [m for m in ("B@1", "B@4", "R-L", "CLIP-V", "CLIP-T")
             if any(m in s for items in table["items"].values() for s in items.values())]
    if not names:
        return "scores.png skipped: no per-item scores"
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], names):
        labels, data = [], []
        for model, items in table["items"].items():
            for split in table["splits"]:
                values = [s[metric] for s in items.values() if s.get("split") == split and metric in s]
                if values:
                    labels.append(f"{model}\n{split}" if len(table["splits"]) > 1 else model)
                    data.append(values)
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, fontsize=7)
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    clip: str | None = None
    clip_arch: str = "auto"  # vans.clip.resolve_clip_arch
    frame_pick: str = "fps"  # the GT clip for CLIP-V, as in training (vans.video.FramePick)
    pick_fps: float = 11.0
    i3d: str | None = None
    device: str = "cpu"
    clip_t_text: str = "gt"
    fvd_frames: int = 16
    fvd_size: int = 224


def _model_or_reason(path: str | None, what: str, flag: str):
    if not path:
        return None, f"no {what} file (pass {flag})"
    if not Path(path).is_file():
        return None, f"{what} file {path} not found"
    return Path(path), None


def evaluate(results: list[Path], names: list[str], truth_path: Path, settings: EvalSettings,
             log=lambda text: print(text, file=sys.stderr)) -> dict:
    """Every metric for every results file and split → the ``table.json`` dictionary."""
    truth = load_manifest(truth_path)
    if not any(item.ground_truth for item in truth):
        raise InputError(f"ground truth {truth_path} has no GT captions (ENG_GT_Caption / ground_truth column)")
    from .video import FramePick

    pick = FramePick(settings.frame_pick, settings.pick_fps)
    pick.validate()
    clip_path, clip_reason = _model_or_reason(settings.clip, "CLIP", "--clip")
    i3d_path, i3d_reason = _model_or_reason(settings.i3d, "I3D", "--i3d")
    scorer = i3d = None
    if clip_path:
        from .clip import load_clip

        scorer = load_clip(clip_path, arch=settings.clip_arch, device=settings.device)
        log(f"CLIP: {clip_path.name} as {scorer.arch} ({scorer.arch_source})")
    if i3d_path:
        from .i3d import load_i3d

        i3d = load_i3d(i3d_path, device=settings.device)
    for reason in (clip_reason and f"CLIP-V, CLIP-T skipped: {clip_reason}", i3d_reason and f"FVD skipped: {i3d_reason}"):
        if reason:
            log(reason)
    table = {"splits": {}, "skipped": {}, "left_out": {}, "items": {},
             "settings": {"rouge_l": ROUGE_L_VARIANT, "frame_pick": pick.mode, "pick_fps": pick.fps, "clip": settings.clip, "clip_arch": scorer.arch if scorer else settings.clip_arch,
                          "i3d": settings.i3d, "clip_t_text": settings.clip_t_text,
                          "fvd_frames": settings.fvd_frames, "fvd_size": settings.fvd_size,
                          "ground_truth": str(truth_path)}}
    for path, name in zip(results, names):
        pairs, left_out = match(path, truth)
        table["left_out"][name] = left_out
        if not pairs:
            log(f"{name}: no finished prediction matches the ground truth ({left_out})")
        splits = sorted({p.split for p in pairs})
        for split in splits:
            group = [p for p in pairs if p.split == split]
            metrics, skipped = text_metrics(group), {}
            if scorer is not None:
                values, why = clip_metrics(group, scorer, settings.clip_t_text, pick)
                metrics.update(values)
                skipped.update(why)
            else:
                skipped.update({"CLIP-V": clip_reason, "CLIP-T": clip_reason})
            if i3d is not None:
                value, why = fvd_metric(group, i3d, settings.fvd_frames, settings.fvd_size, pick)
                metrics["FVD"] = value
                if why:
                    skipped["FVD"] = why
            else:
                skipped["FVD"] = i3d_reason
            table["splits"].setdefault(split, {})[name] = {"metrics": {m: metrics.get(m) for m in METRICS},
                                                           "count": len(group)}
            table["skipped"].setdefault(name, {})[split] = skipped
        table["items"][name] = {p.id: {"split": p.split, **p.scores} for p in pairs}
    return table


def add_parser(sub) -> None:
    from .clip import ARCH_CHOICES
    from .video import FRAME_PICKS

    p = sub.add_parser("eval", help="BLEU@1-4, ROUGE-L, FVD, CLIP-V, CLIP-T of batch results (paper Table 1)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.jsonl of python -m vans batch (one table row each)")
    p.add_argument("--gt", required=True, help="ground truth: VANS CSV or a JSONL/CSV manifest with ground_truth")
    p.add_argument("--out", required=True, help="output folder: table.md, table.json, scores.png")
    p.add_argument("--name", action="append", default=[], help="row name per results file (default: its folder)")
    p.add_argument("--clip", help="open_clip ViT-B/32 safetensors for CLIP-V/CLIP-T (skipped without it)")
    p.add_argument("--clip-arch", choices=ARCH_CHOICES, default="auto",
                   help="CLIP activation: ViT-B-32-quickgelu for OpenAI weights (the paper's CLIP), ViT-B-32 for LAION "
                        "weights; auto reads open_clip_config.json beside the file or the file name, else assumes OpenAI")
    p.add_argument("--frame-pick", choices=FRAME_PICKS, default="fps",
                   help="frames of each GT clip that CLIP-V compares with the answer, as in training: fps (the first "
                        "frames at --pick-fps, default), first (native rate) or spread (over the whole clip)")
    p.add_argument("--pick-fps", type=float, default=11.0, help="frame rate of --frame-pick fps (default 11)")
    p.add_argument("--i3d", help="I3D safetensors (PyTorch I3D key layout) for FVD (skipped without it)")
    p.add_argument("--device", default="cpu", help="device for CLIP and I3D (default cpu)")
    p.add_argument("--clip-t-text", choices=("gt", "pred"), default="gt", help="caption CLIP-T compares with (default gt)")
    p.add_argument("--fvd-frames", type=int, default=16, help="frames per clip for FVD (default 16)")
    p.add_argument("--fvd-size", type=int, default=224, help="I3D input size (default 224)")


def run(args) -> int:
    results = [Path(r) for r in args.results]
    for path in results:
        if not path.is_file():
            raise InputError(f"results file {path} does not exist; pass the results.jsonl of python -m vans batch")
    names = args.name or [p.parent.name or p.stem for p in results]
    if len(names) != len(results):
        raise InputError(f"got {len(names)} --name for {len(results)} results files; give one per file or none")
    settings = EvalSettings(clip=args.clip, clip_arch=args.clip_arch, frame_pick=args.frame_pick, pick_fps=args.pick_fps,
                            i3d=args.i3d, device=args.device, clip_t_text=args.clip_t_text,
                            fvd_frames=args.fvd_frames, fvd_size=args.fvd_size)
    table = evaluate(results, names, Path(args.gt), settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=1, ensure_ascii=False), encoding="utf-8")
    markdown = markdown_table(table)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(plot_scores(table, out / "scores.png"), file=sys.stderr)
    return 0
