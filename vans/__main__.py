"""Command line: ``python -m vans answer …``, ``python -m vans fixtures …``, ``python -m vans batch …``
(many items through ComfyUI servers, ``vans.batch``) and ``python -m vans eval …`` (the Table 1 metrics,
``vans.evaluate``).

    python -m vans answer --demo --out out/              # tiny random models, any CPU, meaningless output
    python -m vans answer --video in.mp4 --question "What happens next?" --models-dir ComfyUI/models --out out/
    python -m vans answer --manifest heldout.jsonl --models-dir ComfyUI/models --out runs/answers/  # then vans eval
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

DEMO_BANNER = (
    "=" * 78 + "\n"
    "DEMO MODE: tiny models with RANDOM weights. The caption and the video below are\n"
    "meaningless; they only show that the whole pipeline runs. Put the real weights in a\n"
    "ComfyUI models/ tree (see README) and drop --demo for real answers.\n" + "=" * 78
)

DEMO_SIZE = dict(width=160, height=96, num_frames=33)


def _answer_parser(sub) -> None:
    from .captioner import DECODING_MODES
    from .prompts import SYSTEM_PROMPTS
    from .video import FRAME_PICKS

    p = sub.add_parser("answer", help="answer a question about a video with a caption and a generated video")
    p.add_argument("--video", help="input video (any format FFmpeg reads); --demo makes one if omitted")
    p.add_argument("--question", help="the question, e.g. 'What will happen next?'")
    p.add_argument("--manifest", help="answer every row of a CSV/JSONL manifest (the columns of `vans batch`) in this "
                                      "process, models loaded once: --out gets results.jsonl + videos/ as `vans "
                                      "batch` writes them (resumable; `vans eval` reads it)")
    p.add_argument("--retry-failed", action="store_true", help="with --manifest: also rerun items that failed")
    p.add_argument("--out", required=True, help="output folder: answer.mp4, answer.txt, answer.json")
    p.add_argument("--demo", action="store_true", help="build tiny random-weight models and run on them (meaningless output)")
    g = p.add_argument_group("model files (default: found in --models-dir or the enclosing ComfyUI/models)")
    g.add_argument("--models-dir", help="a ComfyUI models/ folder")
    for name, text in [("dit", "Wan2.1-T2V-1.3B DiT single file or diffusers folder (VANS vdm.safetensors)"),
                       ("text-encoder", "umT5-XXL single file (fp16/bf16/fp8-scaled) or diffusers text_encoder folder"),
                       ("tokenizer", "umT5 tokenizer folder, only for text-encoder files without an embedded tokenizer"),
                       ("vae", "Wan2.1 VAE single file or diffusers vae folder"),
                       ("vlm", "Qwen2.5-VL-3B-Instruct folder (Hugging Face layout)"),
                       ("vlm-checkpoint", "VANS vlm.safetensors or a trainer export, applied on top of --vlm")]:
        g.add_argument(f"--{name}", help=text)
    g.add_argument("--allow-pickle", action="store_true", help="allow .pt/.pth/.bin pickle files (can run code: trust them first)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if available)")
    r.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    r.add_argument("--no-offload", action="store_true", help="keep every model on the device (needs more memory)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    s = p.add_argument_group("sampling (defaults of the VANS paper and official code)")
    s.add_argument("--seed", type=int, default=0, help="seed for the caption and the video noise (default 0)")
    s.add_argument("--steps", type=int, help="denoising steps (default 50)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5.0)")
    s.add_argument("--shift", type=float, help="flow shift (default 5.0)")
    s.add_argument("--width", type=int, help="video width, multiple of 16 (default 640)")
    s.add_argument("--height", type=int, help="video height, multiple of 16 (default 352)")
    s.add_argument("--frames", type=int, help="video frames, 4n+1 (default 33)")
    s.add_argument("--context", type=int, help="clean context latent frames from the input (default 6)")
    s.add_argument("--fps", type=float, help="fps of the saved answer video (default 11)")
    s.add_argument("--negative-prompt", help="negative prompt (default: Wan's standard one)")
    s.add_argument("--temperature", type=float, help="VLM sampling temperature (default 0.7)")
    s.add_argument("--top-p", type=float, help="VLM nucleus sampling (default 0.9)")
    s.add_argument("--max-new-tokens", type=int, help="VLM token budget (default 1024)")
    s.add_argument("--min-pixels", type=int, help="smallest frame area the VLM sees (default 128·28·28 = 100352)")
    s.add_argument("--max-pixels", type=int, help="largest frame area the VLM sees (default 768·28·28 = 602112)")
    s.add_argument("--frame-pick", choices=FRAME_PICKS,
                   help="which frames of the input clip the video model sees: fps (the first --frames at --pick-fps, "
                        "default), first (the first --frames at the native rate) or spread (over the whole clip)")
    s.add_argument("--pick-fps", type=float, help="frame rate of --frame-pick fps (default 11, the answer's rate)")
    s.add_argument("--system-prompt", choices=tuple(SYSTEM_PROMPTS),
                   help="VLM system prompt: official (the official code's wording, which the released weights were "
                        "trained with; default) or paper (the paper's App. C.2 wording)")
    s.add_argument("--decoding", choices=DECODING_MODES,
                   help="VLM decoding: official (the authors' inference: the model folder's generation_config.json "
                        "with --temperature/--top-p set, so e.g. its repetition penalty applies; default) or policy "
                        "(plain temperature + top-p sampling, as GRPO rollouts)")


def _settings(args):
    from .pipeline import AnswerSettings

    settings = AnswerSettings(seed=args.seed)
    settings.video.seed = args.seed
    if args.demo:
        for k, v in DEMO_SIZE.items():
            setattr(settings.video, k, v)
        settings.caption.max_new_tokens = 48
        settings.caption.min_pixels = 56 * 56
        settings.caption.max_pixels = 112 * 112
    for arg, target, attr in [("steps", settings.video, "steps"), ("guidance", settings.video, "guidance"),
                              ("shift", settings.video, "shift"), ("width", settings.video, "width"),
                              ("height", settings.video, "height"), ("frames", settings.video, "num_frames"),
                              ("context", settings.video, "num_context"), ("fps", settings.video, "fps"),
                              ("negative_prompt", settings.video, "negative_prompt"),
                              ("temperature", settings.caption, "temperature"), ("top_p", settings.caption, "top_p"),
                              ("max_new_tokens", settings.caption, "max_new_tokens"),
                              ("min_pixels", settings.caption, "min_pixels"),
                              ("max_pixels", settings.caption, "max_pixels"),
                              ("system_prompt", settings.caption, "system_prompt"),
                              ("decoding", settings.caption, "decoding")]:
        value = getattr(args, arg)
        if value is not None:
            setattr(target, attr, value)
    if args.frame_pick is not None or args.pick_fps is not None:
        from .video import FramePick

        settings.frame_pick = FramePick(args.frame_pick or settings.frame_pick.mode,
                                        args.pick_fps if args.pick_fps is not None else settings.frame_pick.fps)
    return settings


def run_answer(args) -> int:
    from . import progress
    from .models import require, resolve_models
    from .pipeline import answer, check_inputs, check_output_folder, load_models, pick_device, pick_dtype, save_answer

    out = Path(args.out)
    models_dir = args.models_dir
    video, question = args.video, args.question
    if args.manifest and (video or question is not None):
        print("error: --manifest answers its own rows; drop --video and --question", file=sys.stderr)
        return 2
    if not args.demo and not args.manifest and (not video or question is None):
        print("error: --video and --question are required (or use --manifest or --demo)", file=sys.stderr)
        return 2
    # every input the user gave is checked before the models load (minutes for the real weights)
    check_output_folder(out, what="--out folder")
    if args.demo:
        from .fixtures import write_demo_inputs, write_demo_models

        print(DEMO_BANNER, file=sys.stderr)
        models_dir = write_demo_models(out / "demo_models")
        if not args.manifest:
            video = video or write_demo_inputs(out / "demo_input.mp4")
            question = question or "What will happen next?"
    settings = _settings(args)
    items = None
    if args.manifest:
        from .batch import load_manifest

        items = load_manifest(args.manifest)  # bad videos fail their own item later, never the whole run
        settings.video.validate()
        settings.frame_pick.validate()
    else:
        question = check_inputs(video, question, settings)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    paths = resolve_models(models_dir, dit=args.dit, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                           vae=args.vae, vlm=args.vlm, vlm_checkpoint=args.vlm_checkpoint)
    require(paths, ("dit", "text_encoder", "vae", "vlm"), models_dir)
    t0 = time.perf_counter()
    models = load_models(paths, device=device, dtype=dtype, offload=not args.no_offload, allow_pickle=args.allow_pickle)
    load_s = time.perf_counter() - t0
    ctx = progress.quiet() if args.quiet else contextlib.nullcontext()
    if items is not None:
        from .batch.local import answer_manifest

        extra = {"vlm": {"system_prompt": settings.caption.system_prompt, "decoding": settings.caption.decoding},
                 "models": {k: str(v) for k, v in vars(paths).items() if v is not None}}
        with ctx:
            counts = answer_manifest(models, items, out, settings, record_extra=extra, retry_failed=args.retry_failed,
                                     stream=None if args.quiet else sys.stderr)
        print(json.dumps({"results": str(out / "results.jsonl"), **counts}))
        return 0 if counts.get("ok", 0) == len(items) else 1
    with ctx:
        ans = answer(models, video, question, settings)
    ans.timings = {"load_s": load_s, **ans.timings}
    record = {"demo": bool(args.demo), "input_video": str(video), "seed": args.seed, "device": str(device),
              "dtype": str(dtype).replace("torch.", ""), "settings": settings.to_dict(),
              "models": {k: str(v) for k, v in vars(paths).items() if v is not None},
              "vlm_decoding": models.captioner.decoding_summary(settings.caption.decoding, settings.caption.temperature,
                                                                settings.caption.top_p)}
    if args.demo:
        record["warning"] = "demo mode: random tiny weights, meaningless output"
    full = save_answer(ans, out, record=record)
    print(json.dumps({"caption": full["caption"], "video": str(out / full["video"]), "timings": full["timings"]},
                     ensure_ascii=False))
    if args.demo:
        print(DEMO_BANNER, file=sys.stderr)
    return 0


def run_fixtures(args) -> int:
    from .fixtures import write_demo_models

    path = write_demo_models(Path(args.out))
    print(f"tiny random-weight models written under {path} (ComfyUI models/ layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import VansError

    parser = argparse.ArgumentParser(prog="python -m vans", description="VANS: answer a question about a video with a video")
    sub = parser.add_subparsers(dest="command", required=True)
    _answer_parser(sub)
    f = sub.add_parser("fixtures", help="write tiny random-weight models in every supported format (tests, demo)")
    f.add_argument("--out", required=True, help="folder that becomes a ComfyUI-style models/ tree")
    from . import batch, evaluate

    batch.add_parser(sub)
    evaluate.add_parser(sub)
    args = parser.parse_args(argv)
    commands = {"answer": run_answer, "fixtures": run_fixtures, "batch": batch.run, "eval": evaluate.run}
    try:
        return commands[args.command](args)
    except VansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
