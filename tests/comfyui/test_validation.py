"""No silent partial runs: a bad setting of a VANS node stops the whole prompt with one message naming the
input, in a real ComfyUI server.

ComfyUI (execution.py ``validate_prompt``, 0.3.64 and the 0.38 release files alike) runs every output
whose ancestors pass validation and drops the others: in vnep the caption node is an output of its own,
so a Context Conditioning node failing validation used to leave a run that ended in "success" without
its video, and its ``validate_inputs`` failure was listed once per input it takes (4x). The pack's nodes
accept at validation and check when they run (``nodes/host.py``, ``check_inputs``).
"""

from __future__ import annotations

import pytest

from test_server import by_class, caption_from_video_graph, find_caption_seed, small_vnep


@pytest.fixture(scope="module")
def video(server, tmp_path_factory) -> str:
    from vans.video import synthetic_frames, write_video

    path = tmp_path_factory.mktemp("videos") / "vans_validation.mp4"
    write_video(path, synthetic_frames(40, 96, 128), 16.0)
    name = server.upload(path)
    if "vlm" in server.models.files:
        find_caption_seed(server, name)  # so that a caption run before the failing node does not fail itself
    return name


def submit(server, graph: dict, timeout: float = 300.0):
    """POST /prompt as the UI does; (response, the run's events and history or None when refused)."""
    with server.client() as client:
        response = server.post("/prompt", {"prompt": graph, "client_id": client.client_id})
        if response.status_code != 200:
            return response, None
        return response, client.wait(response.json()["prompt_id"], timeout)


def assert_stopped_once(response, run, node_type: str, message: str) -> None:
    """Accepted with nothing dropped, then one execution_error from ``node_type`` starting with ``message``,
    and no success: the UI shows the error in a dialog."""
    assert response.status_code == 200 and response.json()["node_errors"] == {}, response.text[:2000]
    errors = [data for event, data in run.events if event == "execution_error"]
    assert len(errors) == 1, errors
    assert run.outcome == "execution_error" and run.event("execution_success") is None
    assert errors[0]["node_type"] == node_type, errors[0]
    text = errors[0]["exception_message"].strip()
    assert text.startswith(message) and "\n" not in text, text
    assert run.history["status"]["status_str"] == "error"


def test_num_context_beyond_a_short_clip_stops_the_prompt_with_one_message(server, video):
    server.models.need("vlm", "dit", "vae", "text_encoder")
    graph = small_vnep(video)
    by_class(graph, "VANSContextConditioning")[0]["inputs"].update(length=17, num_context=6)
    response, run = submit(server, graph)
    assert_stopped_once(response, run, "VANSContextConditioning",
                        "num_context=6: a 17-frame clip has 5 latent frames; lower num_context to 5 or raise length to 21")
    save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveVideo")
    assert save_id not in run.outputs


def test_out_of_range_video_setting_is_not_a_dropped_branch(server, video):
    """ComfyUI's own min check would drop the video branch and run the caption to "success"."""
    server.models.need("vlm", "dit", "vae", "text_encoder")
    graph = small_vnep(video)
    by_class(graph, "VANSContextConditioning")[0]["inputs"]["length"] = 3
    response, run = submit(server, graph)
    assert_stopped_once(response, run, "VANSContextConditioning", "length=3: must be between 5 and 16384")


def test_bad_dtype_is_reported_once_on_dtype(server, video):
    server.models.need("vlm", "dit", "vae", "text_encoder")
    graph = small_vnep(video)
    by_class(graph, "VANSLoadVLM")[0]["inputs"]["dtype"] = "bf17"
    response, run = submit(server, graph)
    assert_stopped_once(response, run, "VANSLoadVLM", "dtype: 'bf17' is not one of the choices (auto, bf16, fp16, fp32)")


def test_caption_settings_in_the_wrong_order_name_min_pixels(server, video):
    server.models.need("vlm")
    graph = caption_from_video_graph(video)
    by_class(graph, "VANSNextEventCaption")[0]["inputs"].update(min_pixels=64 * 784, max_pixels=16 * 784)
    response, run = submit(server, graph)
    assert_stopped_once(response, run, "VANSNextEventCaption", "min_pixels=50176 is above max_pixels=12544")


def test_fps_widget_with_a_video_input_says_it_is_not_used(server, video):
    server.models.need("vlm")
    graph = caption_from_video_graph(video)
    caption = by_class(graph, "VANSNextEventCaption")[0]["inputs"]
    caption.update(sample_fps=10.0, fps=99.0)  # 25 frames in 2.5 s, capped at num_frames 6: the same caption
    run = server.run(graph)
    assert run.outcome == "execution_success", run.event("execution_error")
    caption_id = next(k for k, v in graph.items() if v["class_type"] == "VANSNextEventCaption")
    assert "the fps widget applies to the frames input only" in run.outputs[caption_id]["text"][0]
