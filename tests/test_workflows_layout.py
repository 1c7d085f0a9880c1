"""The shipped UI workflows (``workflows/*.json``) read well, checked from their JSON geometry alone (no
ComfyUI needed): no two nodes overlap, no node covers a group's title bar or sticks out of its group,
every working node sits in a group, wires run left to right in dataflow order, and no title carries a
number that goes stale when a widget changes ("KSampler (euler, 50 steps, cfg 5)").

Geometry follows LiteGraph as bundled in ComfyUI's frontend (comfyui-frontend-package 1.27.10, the
version ComfyUI 0.3.64 pins):
- a node's ``pos`` is the top-left corner of its body; its title bar (``LiteGraph.NODE_TITLE_HEIGHT`` = 30)
  is drawn above it, so its box is ``(x, y - 30, w, h + 30)`` (``LGraphNode.measure``);
- a node of a custom pack also shows ComfyUI's node-source badge ("VANS", the default of
  ``Comfy.NodeBadge.NodeSourceBadgeMode``) in a strip of 20 + 2 px above its title bar (``LGraphBadge``
  height, ``LGraphNode.drawBadges`` gap), counted here as part of the node;
- a group's ``bounding`` is ``[x, y, w, h]`` with a title bar of ``font_size * 1.4`` at its top
  (``LGraphGroup.titleHeight``, default font size 24); the frontend counts a node as a group's member when
  the centre of its box lies in the group (``recomputeInsideNodes``).

``layout_problems`` takes plain rectangles so that tests/comfyui/test_frontend.py applies the same rules
to the geometry the real frontend reports after loading each workflow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
NODE_TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT
GROUP_FONT_SIZE = 24  # LGraphGroup.font_size default (LiteGraph.DEFAULT_GROUP_FONT)
GROUP_TITLE_FACTOR = 1.4  # LGraphGroup.titleHeight = font_size * 1.4
BADGE_HEIGHT = 22  # LGraphBadge height 20 + drawBadges gap 2, drawn above the title bar
NOTE_TYPES = {"Note", "MarkdownNote"}  # free-floating text nodes, no inputs or outputs


def ui_workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def has_source_badge(node_type: str) -> bool:
    """ComfyUI badges nodes that are not built in; the pack's node ids all start with VANS."""
    return node_type.startswith("VANS")


def geometry(workflow: dict) -> tuple[list[dict], list[dict], list[tuple[int, int]]]:
    """(nodes, groups, links) of a UI workflow: nodes as ``{id, type, title, rect}`` (title bar and badge
    included), groups as ``{title, rect, title_height}``, links as (source node id, target node id)."""
    nodes = []
    for node in workflow["nodes"]:
        assert not node.get("flags", {}).get("collapsed"), f"node {node['id']} is collapsed"
        (x, y), (w, h) = node["pos"], node["size"]
        top = NODE_TITLE_HEIGHT + (BADGE_HEIGHT if has_source_badge(node["type"]) else 0)
        nodes.append({"id": node["id"], "type": node["type"], "title": node.get("title", node["type"]),
                      "rect": (x, y - top, w, h + top)})
    groups = [{"title": g["title"], "rect": tuple(g["bounding"]),
               "title_height": g.get("font_size", GROUP_FONT_SIZE) * GROUP_TITLE_FACTOR}
              for g in workflow.get("groups", [])]
    links = [(link[1], link[3]) for link in workflow["links"]]
    return nodes, groups, links


def _intersect(a, b) -> bool:
    """Rectangles ``(x, y, w, h)`` share an area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def _name(node: dict) -> str:
    return f"{node['title']!r} (node {node['id']})"


# A number on its own ("shift 5", "11 fps"), not one inside a name ("SD3", "Wan2.1").
NUMBER = re.compile(r"(?<![\w.])\d+(\.\d+)?(?!\w)")


def title_problems(nodes: list[dict], groups: list[dict]) -> list[str]:
    """Titles with a number: "KSampler (50 steps)" keeps saying 50 after the widget changes."""
    found = [f"node title {_name(n)} has a number" for n in nodes if NUMBER.search(n["title"])]
    return found + [f"group title {g['title']!r} has a number" for g in groups if NUMBER.search(g["title"])]


def layout_problems(nodes: list[dict], groups: list[dict], links: list[tuple[int, int]]) -> list[str]:
    """Every way the geometry fails to read well, one line each; an empty list when it is clean."""
    problems = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if _intersect(a["rect"], b["rect"]):
                problems.append(f"{_name(a)} and {_name(b)} overlap")
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            nested = _inside(g["rect"], h["rect"]) or _inside(h["rect"], g["rect"])
            if _intersect(g["rect"], h["rect"]) and not nested:
                problems.append(f"groups {g['title']!r} and {h['title']!r} overlap")
    for g in groups:
        x, y, w, h = g["rect"]
        bar = (x, y, w, g["title_height"])
        body = (x, y + g["title_height"], w, h - g["title_height"])
        for n in nodes:
            if _intersect(n["rect"], bar):
                problems.append(f"{_name(n)} covers the title of group {g['title']!r}")
            elif _intersect(n["rect"], g["rect"]) and not _inside(n["rect"], body):
                problems.append(f"{_name(n)} sticks out of group {g['title']!r}")
    for n in nodes:
        if n["type"] not in NOTE_TYPES and not any(_intersect(n["rect"], g["rect"]) for g in groups):
            problems.append(f"{_name(n)} is in no group")
    by_id = {n["id"]: n for n in nodes}
    for source, target in links:
        a, b = by_id[source], by_id[target]
        if a["rect"][0] + a["rect"][2] > b["rect"][0]:
            problems.append(f"the wire {_name(a)} -> {_name(b)} runs right to left: the target must start "
                            "right of the source's right edge")
    return problems


@pytest.fixture(params=ui_workflows(), ids=lambda p: p.stem)
def workflow(request) -> dict:
    return json.loads(request.param.read_text(encoding="utf-8"))


def test_there_are_ui_workflows():
    assert len(ui_workflows()) >= 3, sorted(p.name for p in WORKFLOWS.iterdir())


def test_nodes_and_groups_do_not_collide_and_wires_run_left_to_right(workflow):
    assert layout_problems(*geometry(workflow)) == []


def test_titles_have_no_numbers(workflow):
    nodes, groups, _ = geometry(workflow)
    assert title_problems(nodes, groups) == []


# Model folder (under ComfyUI/models/) each loader reads, as its Note must name it.
LOADER_FOLDERS = {"UNETLoader": "diffusion_models/", "CLIPLoader": "text_encoders/", "VAELoader": "vae/",
                  "VANSLoadVLM": "LLM/", "VANSLoadCLIP": "reward_models/"}


def test_notes_say_where_the_real_models_go_and_what_the_demo_models_are_for(workflow):
    text = "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in NOTE_TYPES)
    loaders = {n["type"] for n in workflow["nodes"]} & set(LOADER_FOLDERS)
    assert loaders
    for loader in loaders:
        assert LOADER_FOLDERS[loader] in text, loader
    assert "python -m vans fixtures" in text and "for the command line and the tests only" in text


# -- the rules themselves, on hand-made geometry ---------------------------------------------------
def _node(i, x, y, w=100, h=50, type_="KSampler", title=None):
    return {"id": i, "type": type_, "title": title or f"node {chr(96 + i)}",
            "rect": (x, y - NODE_TITLE_HEIGHT, w, h + NODE_TITLE_HEIGHT)}


GROUP = {"title": "Group", "rect": (0, 0, 400, 300), "title_height": 33.6}


def test_rules_accept_a_clean_layout():
    nodes = [_node(1, 10, 80), _node(2, 150, 80), _node(3, 500, 80, type_="Note")]
    assert layout_problems(nodes, [GROUP], [(1, 2)]) == []


@pytest.mark.parametrize("nodes, links, expected", [
    ([_node(1, 10, 80), _node(2, 60, 100)], [], "overlap"),  # bodies overlap
    ([_node(1, 10, 80), _node(2, 10, 150)], [], "overlap"),  # 2's title bar lies on 1's body
    ([_node(1, 10, 50)], [], "covers the title of group"),  # title bar reaches into y < 33.6
    ([_node(1, 350, 80)], [], "sticks out of group"),
    ([_node(1, 10, 80), _node(2, 600, 80)], [], "is in no group"),
    ([_node(1, 10, 80), _node(2, 150, 80)], [(2, 1)], "runs right to left"),
    ([_node(1, 10, 80), _node(2, 100, 200)], [(1, 2)], "runs right to left"),  # stacked: the wire doubles back
])
def test_rules_catch(nodes, links, expected):
    problems = layout_problems(nodes, [GROUP], links)
    assert problems and all(expected in p for p in problems), problems


def test_the_badge_of_a_pack_node_counts_as_part_of_it():
    workflow = {"nodes": [{"id": 1, "type": "KSampler", "pos": [10, 70], "size": [100, 50]},
                          {"id": 2, "type": "VANSBleu", "pos": [150, 70], "size": [100, 50]}],
                "groups": [{"title": "Group", "bounding": [0, 0, 400, 300]}], "links": []}
    assert layout_problems(*geometry(workflow)) == ["'VANSBleu' (node 2) covers the title of group 'Group'"]


def test_rules_catch_overlapping_groups_and_numbered_titles():
    other = {"title": "Other (shift 5)", "rect": (300, 100, 400, 200), "title_height": 33.6}
    assert any("groups" in p for p in layout_problems([], [GROUP, other], []))
    nodes = [_node(1, 10, 80, title="KSampler (50 steps)"), _node(2, 150, 80, title="ModelSamplingSD3 (flow shift)"),
             _node(3, 300, 80, title="Create Video (11.5 fps)"), _node(4, 450, 80, title="Load VAE (Wan2.1)")]
    assert title_problems(nodes, [GROUP, other]) == ["node title 'KSampler (50 steps)' (node 1) has a number",
                                                     "node title 'Create Video (11.5 fps)' (node 3) has a number",
                                                     "group title 'Other (shift 5)' has a number"]
