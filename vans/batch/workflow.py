"""The API-format workflow: ``load_workflow``, ``--set`` overrides (``parse_set``, ``apply_overrides``), node
lookup by class or title, and ``WorkflowTemplate``, which fills the workflow in for one item."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from .manifest import Item, safe_name

DEFAULT_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "vnep.json"
CAPTION_CLASS = "VANSNextEventCaption"
VIDEO_LOADERS = {"LoadVideo": "file", "VHS_LoadVideo": "video"}  # class -> input holding the file name
OUTPUT_KEYS = ("images", "videos", "gifs")  # ui keys under which output nodes list saved files


def load_workflow(path: str | os.PathLike | None = None) -> dict:
    """An API-format workflow (``{node_id: {"class_type", "inputs"}}``); the shipped vnep one by default."""
    path = Path(path) if path else DEFAULT_WORKFLOW
    if not path.suffix and not path.exists():
        path = DEFAULT_WORKFLOW.parent / f"{path}.json"  # a shipped name such as "vnep"
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"workflow {path} does not exist; pass an API-format workflow (Export (API))") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"workflow {path} is not JSON ({exc.msg}); export it with Export (API)") from None
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise InputError(f"workflow {path} is not in API format (no class_type per node); use Export (API)")
    return graph


def title(node: dict) -> str:
    return node.get("_meta", {}).get("title", "")


def find_nodes(graph: dict, key: str) -> list[str]:
    """Ids of the nodes whose class_type or title equals ``key``."""
    return [nid for nid, node in graph.items() if key in (node["class_type"], title(node))]


def _one_node(graph: dict, classes: Iterable[str], chosen: str | None, what: str, option: str) -> str:
    if chosen:
        ids = find_nodes(graph, chosen)
        if len(ids) != 1:
            raise InputError(f"workflow has {len(ids)} nodes with class or title {chosen!r} for the {what}; "
                             f"give {option} a title that names exactly one node")
        return ids[0]
    ids = [nid for nid, node in graph.items() if node["class_type"] in classes]
    if len(ids) != 1:
        raise InputError(f"workflow has {len(ids)} {'/'.join(classes)} nodes for the {what}; "
                         f"name one by its title with {option}")
    return ids[0]


def parse_set(values: Iterable[str]) -> list[tuple[str, str, object]]:
    """``KEY.input=VALUE`` strings → (key, input, value); VALUE is JSON when it parses, else a string."""
    out = []
    for text in values:
        target, sep, raw = text.partition("=")
        key, dot, name = target.rpartition(".")
        if not sep or not dot or not key or not name:
            raise InputError(f"--set {text!r} is not KEY.input=VALUE (KEY a node class or title), e.g. KSampler.steps=2")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((key, name, value))
    return out


def apply_overrides(graph: dict, overrides: list[tuple[str, str, object]]) -> None:
    for key, name, value in overrides:
        ids = find_nodes(graph, key)
        if not ids:
            raise InputError(f"--set {key}.{name}: no node has class or title {key!r}; check the workflow")
        for nid in ids:
            graph[nid]["inputs"][name] = value


@dataclass
class WorkflowTemplate:
    """A workflow with the nodes to fill located once (by class and title)."""

    graph: dict
    video_node: str
    question_node: str
    overrides: list = field(default_factory=list)

    @classmethod
    def build(cls, graph: dict, *, video_node: str | None = None, question_node: str | None = None,
              overrides: list | None = None) -> "WorkflowTemplate":
        graph = copy.deepcopy(graph)
        apply_overrides(graph, overrides or [])
        vid = _one_node(graph, VIDEO_LOADERS, video_node, "question video", "--video-node")
        qid = _one_node(graph, (CAPTION_CLASS,), question_node, "question", "--question-node")
        if "question" not in graph[qid]["inputs"]:
            raise InputError(f"node {title(graph[qid]) or qid} has no 'question' input; name the caption node with --question-node")
        return cls(graph, vid, qid, overrides or [])

    @property
    def vlm_settings(self) -> dict:
        """The caption node's prompt and decoding choices, recorded with every result (an API workflow saved
        before these inputs existed runs with the node's defaults, "official")."""
        inputs = self.graph[self.question_node]["inputs"]
        return {key: inputs.get(key, "official") for key in ("system_prompt", "decoding")}

    def fill(self, item: Item, video_name: str) -> dict:
        graph = copy.deepcopy(self.graph)
        loader = graph[self.video_node]
        loader["inputs"][VIDEO_LOADERS.get(loader["class_type"], "file")] = video_name
        graph[self.question_node]["inputs"]["question"] = item.question
        for node in graph.values():
            inputs = node["inputs"]
            if item.seed is not None and isinstance(inputs.get("seed"), int):
                inputs["seed"] = item.seed
            if isinstance(inputs.get("filename_prefix"), str):
                inputs["filename_prefix"] = f"vans_batch/{safe_name(item.id)}"
        return graph
