"""``python -m vans batch`` against real ComfyUI servers (tiny random-weight models, 32×32×9 videos, 1 step):
a 10-item batch, a server restart in the middle followed by a rerun, a corrupt video that fails alone with
the server's message, and items spread over two servers on two ports."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from vans.batch import BatchRunner, BatchSettings, WorkflowTemplate, load_manifest, load_workflow, parse_set

# CPU sizes, as the other server tests use; every other value as shipped.
SMALL = ["VANSContextConditioning.width=32", "VANSContextConditioning.height=32", "VANSContextConditioning.length=9",
         "VANSContextConditioning.num_context=2",
         "KSampler.steps=1", "VANSNextEventCaption.max_new_tokens=12", "VANSNextEventCaption.min_pixels=3136",
         "VANSNextEventCaption.max_pixels=12544"]
FAST = dict(backoff=0.5, max_backoff=4.0, poll=0.5, server_timeout=90.0, retries=3)


@pytest.fixture(scope="module", autouse=True)
def models_needed(server):
    server.models.need("vlm", "dit", "vae", "text_encoder")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Ten small distinct clips and one corrupt file."""
    from vans.video import synthetic_frames, write_video

    folder = tmp_path_factory.mktemp("batch_clips")
    for i in range(10):
        write_video(folder / f"clip{i}.mp4", synthetic_frames(17, 48, 64, seed=100 + i), 16.0)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    return folder


def caption_works(server, clip, question: str, seed: int) -> bool:
    """Whether the tiny VLM writes a non-empty caption for this clip, question and seed (it has random
    weights; for some inputs it answers nothing, which the caption node refuses)."""
    import copy

    graph = {k: copy.deepcopy(v) for k, v in load_workflow().items()
             if v["class_type"] in ("LoadVideo", "VANSLoadVLM", "VANSNextEventCaption")}
    template = WorkflowTemplate.build(graph, overrides=parse_set([s for s in SMALL if s.startswith("VANSNext")]))
    from vans.batch import Item

    name = server.upload(clip)
    filled = template.fill(Item(id="probe", video=str(clip), question=question, seed=seed), name)
    return server.run(filled).outcome == "execution_success"


@pytest.fixture(scope="module")
def manifest(server, clips, tmp_path_factory):
    """10 items, each with a caption seed for which the tiny VLM answers (so the batch can complete)."""
    lines = []
    for i in range(10):
        question = f"What will happen next in clip {i}?"
        seed = next((s for s in range(12) if caption_works(server, clips / f"clip{i}.mp4", question, s)), None)
        assert seed is not None, f"the tiny VLM gave an empty caption for clip {i} with 12 seeds"
        lines.append({"id": f"item{i}", "video": str(clips / f"clip{i}.mp4"), "question": question, "seed": seed})
    path = tmp_path_factory.mktemp("batch_manifest") / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def runner(manifest, out, urls, **settings) -> BatchRunner:
    template = WorkflowTemplate.build(load_workflow(), overrides=parse_set(SMALL))
    return BatchRunner(load_manifest(manifest), template, out, BatchSettings(servers=urls, **{**FAST, **settings}),
                       quiet=True)


def read(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def check_all_done(out, n: int = 10):
    rows = read(out)
    assert len(rows) == n
    assert Counter(r["id"] for r in rows) == Counter({f"item{i}": 1 for i in range(n)})  # each exactly once
    for r in rows:
        assert r["status"] == "ok", r
        assert r["caption"].strip(), r
        assert (out / r["video"]).stat().st_size > 0
    from vans.video import probe

    info = probe(out / rows[0]["video"])
    assert (info.frames, info.height, info.width) == (9, 32, 32)
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"item{i}.mp4" for i in range(n))


def test_ten_item_batch_completes(server, manifest, tmp_path):
    t0 = time.monotonic()
    counts = runner(manifest, tmp_path / "out", [server.url], in_flight=2).run()
    print(f"10 items in {time.monotonic() - t0:.1f} s")
    assert counts == {"ok": 10}
    check_all_done(tmp_path / "out")


def test_server_restart_mid_batch_then_rerun(server, manifest, tmp_path):
    out = tmp_path / "out"
    batch = runner(manifest, out, [server.url], in_flight=2)
    done = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: (result.update(counts=batch.run()), done.set()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(batch.store.records) < 3:
        time.sleep(0.2)
    assert len(batch.store.records) >= 3, "the batch did not get going"
    assert not done.is_set(), "the batch ended before the restart; nothing was tested"
    server.stop()  # mid-batch: its queue and history are gone
    time.sleep(1.0)
    server.start()
    thread.join(timeout=240)
    assert done.is_set(), "the batch did not finish after the restart"
    # the first run survives the restart; the rerun then finds everything done and runs nothing
    assert result["counts"] == {"ok": 10}
    assert any(r["attempts"] > 1 for r in read(out)), "no prompt was lost at the restart"
    before = (out / "results.jsonl").read_text()
    counts = runner(manifest, out, [server.url]).run()
    assert counts == {"ok": 10}
    assert (out / "results.jsonl").read_text() == before
    check_all_done(out)


def test_corrupt_video_fails_alone_with_the_server_message(server, manifest, clips, tmp_path):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:2]]
    rows.append({"id": "bad", "video": str(clips / "corrupt.mp4"), "question": "What next?"})
    path = tmp_path / "with_corrupt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    counts = runner(path, out, [server.url]).run()
    assert counts == {"ok": 2, "error": 1}
    bad = next(r for r in read(out) if r["id"] == "bad")
    assert bad["attempts"] == 1 and bad["video"] == ""
    assert "vans_batch_" in bad["error"] and "(node " in bad["error"], bad["error"]  # the server's own message
    print("corrupt video:", bad["error"])


@pytest.fixture(scope="module")
def second_server(comfyui_dir, tiny_models, tmp_path_factory):
    from conftest import PACK_ROOT
    from server_harness import ComfyServer

    with ComfyServer(comfyui_dir, PACK_ROOT, tiny_models, tmp_path_factory.mktemp("comfy_server_2")) as srv:
        yield srv


def test_items_spread_over_two_servers(server, second_server, manifest, tmp_path):
    assert server.port != second_server.port
    four = tmp_path / "four.jsonl"
    four.write_text("".join(manifest.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "out"
    t0 = time.monotonic()
    counts = runner(four, out, [server.url, second_server.url], in_flight=1).run()
    print(f"4 items on two servers in {time.monotonic() - t0:.1f} s")
    assert counts == {"ok": 4}
    check_all_done(out, 4)
    per_server = Counter(r["server"] for r in read(out))
    assert set(per_server) == {server.url, second_server.url} and min(per_server.values()) >= 1, per_server
