"""Batch answering through the ComfyUI HTTP API: ``python -m vans batch MANIFEST --out DIR``.

For each manifest row (a video and a question) the shipped API-format workflow (``workflows/api/vnep.json``
unless ``--workflow`` names another) is filled in, queued on a ComfyUI server and its outputs are
downloaded into ``DIR``:

* ``DIR/results.jsonl``: one line per item (``id, question, input_video, caption, think, video, seconds,
  status, error, server, prompt_id, attempts``); ``video`` is relative to ``DIR``;
* ``DIR/videos/<id>.mp4``: the answer video(s) (``<id>_<k>.mp4`` when the workflow saves several).

Manifest: CSV or JSONL with the columns ``video`` and ``question`` (the VANS CSV names
``input_video_path`` / ``ENG_Instruction`` are understood too), optional ``id`` (default: a hash of video
and question, so reruns find the same ids), ``ground_truth`` (``ENG_GT_Caption``, or ``caption`` as in the trainer's JSONL), ``gt_video``
(``output_video_path``), ``split`` and ``seed``. Relative video paths are relative to the manifest.

Filling the workflow never relies on node numbers: the question video goes into the ``LoadVideo`` node (or the
one titled ``--video-node``), the question into the ``VANSNextEventCaption`` node (or ``--question-node``),
a per-item ``seed`` into every literal ``seed`` input, and every ``filename_prefix`` becomes
``vans_batch/<id>``. ``--set KEY.input=VALUE`` changes any input of the nodes whose class or title is KEY.

Transport: only the standard library. HTTP through ``urllib``; progress through a minimal RFC 6455
websocket client (``WebSocket``, text frames only: ComfyUI's binary preview frames are skipped). The
websocket only drives the display and wakes the client early: ``/history`` is the source of truth and is
also polled, so a lost event never loses an item.

Robustness:

* resumable: items whose last record is ``ok`` are skipped on a rerun (``error`` ones too, unless
  ``--retry-failed``); records are appended as they finish and the file is compacted to one line per
  item (manifest order) at the end;
* a ``submitted`` record (``server``, ``prompt_id``) is appended as soon as a prompt is queued: a rerun
  after a killed client asks that server (when it is in its ``--server`` list) instead of queueing the
  item again: finished prompts are collected, queued ones waited for, unknown ones queued again; Ctrl-C
  withdraws the in-flight prompts from the servers and compacts the file before exiting (status 130);
* a malformed server reply (not JSON, a key missing) is retried like a transient failure; an unreadable
  local video fails its item;
* transient failures (connection refused or reset, HTTP 5xx, a prompt the server lost because it
  restarted, an interrupted prompt) are retried ``--retries`` times with exponential backoff; the item
  is then recorded ``gave_up`` and is retried on the next run;
* a server that goes away is waited for (``--server-timeout`` seconds) and its in-flight prompts are
  checked against its ``/history`` and ``/queue`` when it is back: finished ones are collected, lost ones
  queued again;
* a validation error (HTTP 400 from ``/prompt``) or an execution error fails that item alone, with the
  server's message in ``error``;
* ``--item-timeout`` bounds how long one prompt may run on the server: past it the prompt is interrupted
  there and the item fails alone;
* up to ``--in-flight`` prompts per server; several ``--server`` URLs share one work list (one ComfyUI
  per GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .manifest import COLUMNS, Item, item_id, load_manifest, safe_name
from .results import DONE, FAILED, GAVE_UP, RESULTS_NAME, SUBMITTED, VIDEO_DIR, ResultStore, read_results
from .runner import BatchRunner, BatchSettings, Display, Job, Scheduler
from .runner import _ServerWorker  # noqa: F401 - not public; tests/test_batch.py drives one directly
from .transport import (DEFAULT_SERVER, ComfyClient, PromptRejected, ServerUnavailable, WebSocket, execution_message,
                        validation_message)
from .workflow import (CAPTION_CLASS, DEFAULT_WORKFLOW, OUTPUT_KEYS, VIDEO_LOADERS, WorkflowTemplate, apply_overrides,
                       find_nodes, load_workflow, parse_set, title)

__all__ = [
    "CAPTION_CLASS", "COLUMNS", "DEFAULT_SERVER", "DEFAULT_WORKFLOW", "DONE", "FAILED", "GAVE_UP", "OUTPUT_KEYS",
    "RESULTS_NAME", "SUBMITTED", "VIDEO_DIR", "VIDEO_LOADERS",
    "BatchRunner", "BatchSettings", "ComfyClient", "Display", "Item", "Job", "PromptRejected", "ResultStore",
    "Scheduler", "ServerUnavailable", "WebSocket", "WorkflowTemplate",
    "add_parser", "apply_overrides", "execution_message", "find_nodes", "item_id", "load_manifest",
    "load_workflow", "parse_set", "read_results", "run", "safe_name", "title", "validation_message",
]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="answer every row of a manifest through ComfyUI servers (HTTP API)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="CSV or JSONL: video, question, optional id, ground_truth, gt_video, split, seed")
    p.add_argument("--out", required=True, help="output folder: results.jsonl and videos/")
    p.add_argument("--workflow", help="API-format workflow (default: the shipped workflows/api/vnep.json)")
    p.add_argument("--server", action="append", dest="servers",
                   help=f"ComfyUI URL; repeat to spread items over several servers (default {DEFAULT_SERVER})")
    p.add_argument("--in-flight", type=int, default=2, help="prompts queued per server at a time (default 2)")
    p.add_argument("--retries", type=int, default=3, help="retries of an item after transient failures (default 3)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time (default 1)")
    p.add_argument("--server-timeout", type=float, default=120.0,
                   help="seconds to wait for a server that went away before leaving its items to others (default 120)")
    p.add_argument("--item-timeout", type=float, default=0.0,
                   help="fail an item whose prompt runs longer than this many seconds on the server, and "
                        "interrupt it there (default 0: no limit; a rerun with --retry-failed tries it again)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.INPUT=VALUE",
                   help="set an input on the nodes whose class or title is KEY, e.g. KSampler.steps=20 (repeatable)")
    p.add_argument("--video-node", help="title of the Load Video node for the question video (if several)")
    p.add_argument("--question-node", help="title of the caption node that takes the question (if several)")
    p.add_argument("--retry-failed", action="store_true", help="also rerun items that failed with an error")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    if args.in_flight < 1 or args.retries < 0:
        raise InputError("--in-flight must be at least 1 and --retries at least 0")
    items = load_manifest(args.manifest)
    template = WorkflowTemplate.build(load_workflow(args.workflow), video_node=args.video_node,
                                      question_node=args.question_node, overrides=parse_set(args.set))
    settings = BatchSettings(servers=args.servers or [DEFAULT_SERVER], in_flight=args.in_flight,
                             retries=args.retries, backoff=args.backoff, server_timeout=args.server_timeout,
                             retry_failed=args.retry_failed, item_timeout=args.item_timeout)
    runner = BatchRunner(items, template, Path(args.out), settings, quiet=args.quiet)
    counts = runner.run()
    print(json.dumps({"results": str(runner.store.path), **counts}))
    return 0 if counts.get(DONE, 0) == len(items) else 1
