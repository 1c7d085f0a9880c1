"""Hostile API payloads against the pack in a real ComfyUI server: wrong types, out-of-range values, paths
out of ComfyUI's folders, links of the wrong type. Each is refused with a message naming the input, by
ComfyUI's own validation (HTTP 400: it converts widget values to their declared type and checks link
types before any node code runs) or by the node when it runs (one execution_error); the server serves on.
"""

from __future__ import annotations

import re
import shutil

import pytest

from test_server import by_class, caption_from_video_graph, find_caption_seed, small_vnep
from test_validation import submit

UP = "../" * 24  # more than any folder depth: resolves to the file system root


@pytest.fixture(scope="module")
def video(server, tmp_path_factory) -> str:
    from vans.video import synthetic_frames, write_video

    path = tmp_path_factory.mktemp("videos") / "vans_hostile.mp4"
    write_video(path, synthetic_frames(40, 96, 128), 16.0)
    name = server.upload(path)
    shutil.copy(server.base / "input" / name, server.base / "outside_input.mp4")  # a real video, out of input/
    if "vlm" in server.models.files:
        find_caption_seed(server, name)
    return name


def caption_node(graph: dict) -> dict:
    return by_class(graph, "VANSNextEventCaption")[0]["inputs"]


def loader_node(graph: dict) -> dict:
    return by_class(graph, "VANSLoadVLM")[0]["inputs"]


def context_node(graph: dict) -> dict:
    return by_class(graph, "VANSContextConditioning")[0]["inputs"]


# (case, graph, edit, node type, input, where, the message (a regex, from its start) when the node refuses it)
CAPTION = "VANSNextEventCaption"
CASES = [
    ("int as text", "caption", lambda g: caption_node(g).update(num_frames="abc"), CAPTION, "num_frames", 400, None),
    ("float as text", "caption", lambda g: caption_node(g).update(top_p="high"), CAPTION, "top_p", 400, None),
    ("NaN", "caption", lambda g: caption_node(g).update(temperature="nan"), CAPTION, "temperature", "run",
     r"temperature: expected a finite number, got float nan$"),
    ("combo as number", "caption", lambda g: loader_node(g).update(dtype=7), "VANSLoadVLM", "dtype", "run",
     r"dtype: int 7 is not one of the choices \(auto, bf16, fp16, fp32\)$"),
    ("seed below 0", "caption", lambda g: caption_node(g).update(seed=-1), CAPTION, "seed", "run",
     r"seed=-1: must be between 0 and 18446744073709551615$"),
    ("huge token budget", "caption", lambda g: caption_node(g).update(max_new_tokens=10**9), CAPTION, "max_new_tokens",
     "run", r"max_new_tokens=1000000000: must be between 1 and 8192$"),
    ("odd frame count", "caption", lambda g: caption_node(g).update(num_frames=7), CAPTION, "num_frames", "run",
     r"num_frames=7: use an even number"),
    ("model path", "caption", lambda g: loader_node(g).update(model=UP + "etc"), "VANSLoadVLM", "model", "run",
     r"model: '(\.\./)+.* is not one of the choices \(Qwen2\.5-VL-3B-Instruct\)$"),
    ("checkpoint path", "caption", lambda g: loader_node(g).update(checkpoint=UP + "etc/passwd"), "VANSLoadVLM",
     "checkpoint", "run", r"checkpoint: '(\.\./)+.* is not one of the choices \(none, vlm\.safetensors\)$"),
    ("video path to a system file", "caption", lambda g: by_class(g, "LoadVideo")[0]["inputs"].update(file=UP + "etc/passwd"),
     CAPTION, "video", "run", r"video: the file '.*/etc/passwd' lies outside ComfyUI's input, output and temp folders"),
    ("video path to a real video out of input", "caption",
     lambda g: by_class(g, "LoadVideo")[0]["inputs"].update(file="../outside_input.mp4"), CAPTION, "video", "run",
     r"video: the file '.*outside_input\.mp4' lies outside ComfyUI's input"),
    ("VIDEO into the vlm socket", "caption", lambda g: caption_node(g).update(vlm=["5", 0]), CAPTION, "vlm", 400, None),
    ("VANS_VLM into the frames socket", "caption",
     lambda g: (caption_node(g).pop("video"), caption_node(g).update(frames=["7", 0])), CAPTION, "frames", 400, None),
    ("frame_pick", "vnep", lambda g: context_node(g).update(frame_pick="zzz"), "VANSContextConditioning", "frame_pick",
     "run", r"frame_pick: 'zzz' is not one of the choices \(fps, first, spread\)$"),
    ("pick_fps NaN", "vnep", lambda g: context_node(g).update(pick_fps="nan"), "VANSContextConditioning", "pick_fps",
     "run", r"pick_fps: expected a finite number, got float nan$"),
    ("no context", "vnep", lambda g: context_node(g).update(num_context=0), "VANSContextConditioning", "num_context",
     "run", r"num_context=0: must be between 1 and 1024$"),
    ("width not a multiple of 16", "vnep", lambda g: context_node(g).update(width=70), "VANSContextConditioning",
     "width", "run", r"width=70: must be a multiple of 16"),
]


@pytest.mark.parametrize("case,graph_name,edit,node_type,name,where,message", CASES, ids=[c[0] for c in CASES])
def test_hostile_payload_is_refused_naming_the_input(server, video, case, graph_name, edit, node_type, name, where,
                                                     message):
    server.models.need("vlm", *(("dit", "vae", "text_encoder") if graph_name == "vnep" else ()))
    graph = small_vnep(video) if graph_name == "vnep" else caption_from_video_graph(video)
    edit(graph)
    response, run = submit(server, graph)
    if where == 400:  # ComfyUI's own validation: one error, on that input
        assert response.status_code == 400, response.text[:2000]
        node_id = next(k for k, v in graph.items() if v["class_type"] == node_type)
        errors = response.json()["node_errors"][node_id]["errors"]
        assert [e["extra_info"]["input_name"] for e in errors] == [name], errors
        assert "not supported between instances" not in response.text
        return
    assert response.status_code == 200 and response.json()["node_errors"] == {}, response.text[:2000]
    errors = [data for event, data in run.events if event == "execution_error"]
    assert run.outcome == "execution_error" and len(errors) == 1, run.events[-3:]
    assert errors[0]["node_type"] == node_type
    text = errors[0]["exception_message"].strip()
    assert re.match(message, text) and "\n" not in text, text


def test_server_still_serves_after_the_hostile_payloads(server, video):
    server.models.need("vlm")
    run = server.run(caption_from_video_graph(video))
    assert run.outcome == "execution_success", run.event("execution_error")
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert "VANSNextEventCaption" in server.get("/object_info/VANSNextEventCaption")
