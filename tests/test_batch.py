"""``vans.batch`` without ComfyUI: manifest parsing, workflow filling, resume bookkeeping, result writing, and the
client against a fake ComfyUI written here on the stdlib ``http.server`` (HTTP API + websocket): retries with
backoff, a validation error and an execution error that fail one item, a server restart mid-batch, and
items spread over two servers."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vans import batch
from vans.batch import (BatchRunner, BatchSettings, ResultStore, WorkflowTemplate, item_id, load_manifest,
                        load_workflow, parse_set)
from vans.errors import InputError

# ---------------------------------------------------------------------------------------------
# A fake ComfyUI
# ---------------------------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([n]) if n < 126 else (bytes([126]) + struct.pack(">H", n) if n < 65536
                                       else bytes([127]) + struct.pack(">Q", n))
    return head + payload


class FakeComfy:
    """Enough of ComfyUI's HTTP API for the batch client. Executes one prompt at a time (FIFO)."""

    def __init__(self, port: int = 0, delay: float = 0.02):
        self.delay = delay
        self.port = port
        self.inputs: dict[str, bytes] = {}
        self.outputs: dict[str, bytes] = {}
        self.history: dict[str, dict] = {}
        self.queue: list[tuple[str, dict, str]] = []
        self.executed: list[str] = []  # prompt ids run to the end (across restarts)
        self.questions: list[str] = []
        self.deleted: set[str] = set()
        self.fail_posts = 0  # answer the next N /prompt with 503
        self.garbled_posts = 0  # answer the next N /prompt with HTTP 200 and a body that is not JSON
        self.posts: list[str] = []  # the question of every graph POSTed to /prompt
        self.paused = threading.Event()  # while set, nothing is executed (prompts stay queued)
        self.pongs = 0
        self.sockets: dict[str, tuple[socket.socket, threading.Lock]] = {}
        self.lock = threading.Lock()
        self.httpd = None
        self.running = False
        self.on_executed = None
        self.interrupts: list[str] = []
        self.interrupt = threading.Event()

    # -- life cycle
    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle_get(self)

            def do_POST(self):
                fake.handle_post(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.running = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self.execute_loop, daemon=True).start()
        return self

    def stop(self):
        """Like killing ComfyUI: queue, history and websockets are gone; the port refuses connections."""
        self.running = False
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for sock, _ in self.sockets.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self.sockets.clear()
            self.queue.clear()
            self.history.clear()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    # -- HTTP
    def reply(self, h, status: int, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle_get(self, h):
        path, _, query = h.path.partition("?")
        if path == "/ws":
            return self.websocket(h, dict(p.split("=", 1) for p in query.split("&") if "=" in p))
        if path == "/system_stats":
            return self.reply(h, 200, {"system": {}})
        if path == "/queue":
            with self.lock:
                pending = [[i, pid, g, {}, []] for i, (pid, g, _) in enumerate(self.queue)]
            return self.reply(h, 200, {"queue_running": pending[:1], "queue_pending": pending[1:]})
        if path.startswith("/history/"):
            pid = path.split("/")[-1]
            with self.lock:
                entry = self.history.get(pid)
            return self.reply(h, 200, {pid: entry} if entry else {})
        if path == "/view":
            params = dict(p.split("=", 1) for p in query.split("&"))
            data = self.outputs.get(params["filename"])
            return self.reply(h, 200 if data else 404, data or b"not found", "video/mp4")
        return self.reply(h, 404, {"error": "not found"})

    def handle_post(self, h):
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        if h.path == "/upload/image":
            name, content = parse_upload(body, h.headers["Content-Type"])
            self.inputs[name] = content
            return self.reply(h, 200, {"name": name, "subfolder": "", "type": "input"})
        if h.path == "/prompt":
            if self.fail_posts > 0:
                self.fail_posts -= 1
                return self.reply(h, 503, b"busy", "text/plain")
            payload = json.loads(body)
            graph, client_id = payload["prompt"], payload.get("client_id", "")
            caption_id = next(k for k, n in graph.items() if n["class_type"] == "VANSNextEventCaption")
            self.posts.append(graph[caption_id]["inputs"]["question"])
            if self.garbled_posts > 0:
                self.garbled_posts -= 1
                return self.reply(h, 200, b"<html>proxy error</html>", "text/html")
            if graph[caption_id]["inputs"]["question"].startswith("INVALID"):
                return self.reply(h, 400, {
                    "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                              "details": "", "extra_info": {}},
                    "node_errors": {caption_id: {"errors": [{"type": "custom_validation_failed",
                                                             "message": "Failed to validate prompt for output",
                                                             "details": "question: the question is empty"}],
                                                 "class_type": "VANSNextEventCaption"}}})
            pid = str(uuid.uuid4())
            node_errors = {}
            if graph[caption_id]["inputs"]["question"].startswith("PARTIAL"):  # like ComfyUI: the valid outputs run
                node_errors = {"9": {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                                                 "details": "length - num_context=6: must be between 1 and 3"}],
                                     "dependent_outputs": ["15"], "class_type": "VANSContextConditioning"}}
            with self.lock:
                self.queue.append((pid, graph, client_id))
            return self.reply(h, 200, {"prompt_id": pid, "number": len(self.queue), "node_errors": node_errors})
        if h.path == "/interrupt":
            self.interrupts.append(json.loads(body or b"{}").get("prompt_id", ""))
            self.interrupt.set()
            return self.reply(h, 200, {})
        if h.path == "/queue":
            deleted = set(json.loads(body).get("delete", []))
            with self.lock:
                self.deleted |= deleted
                self.queue[1:] = [q for q in self.queue[1:] if q[0] not in deleted]
            return self.reply(h, 200, {})
        return self.reply(h, 404, {"error": "not found"})

    # -- websocket
    def websocket(self, h, params):
        accept = base64.b64encode(hashlib.sha1((h.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
        h.send_response(101)
        h.send_header("Upgrade", "websocket")
        h.send_header("Connection", "Upgrade")
        h.send_header("Sec-WebSocket-Accept", accept)
        h.end_headers()
        h.wfile.flush()
        sock = h.connection
        with self.lock:
            self.sockets[params.get("clientId", "")] = (sock, threading.Lock())
        self.send(params.get("clientId", ""), {"type": "status", "data": {"sid": params.get("clientId")}})
        try:
            while True:
                head = h.rfile.read(2)
                if len(head) < 2:
                    break
                n = head[1] & 0x7F
                if n == 126:
                    n = struct.unpack(">H", h.rfile.read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", h.rfile.read(8))[0]
                mask = h.rfile.read(4)
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(h.rfile.read(n)))
                opcode = head[0] & 0x0F
                if opcode == 0xA and payload == b"hello":
                    self.pongs += 1
                if opcode == 0x8:
                    break
        except OSError:
            pass
        h.close_connection = True

    def send_raw(self, client_id: str, data: bytes):
        with self.lock:
            entry = self.sockets.get(client_id)
        if entry is None:
            return
        sock, lock = entry
        try:
            with lock:
                sock.sendall(data)
        except OSError:
            pass

    def send(self, client_id: str, message: dict):
        self.send_raw(client_id, ws_frame(0x1, json.dumps(message).encode()))

    # -- execution
    def execute_loop(self):
        while self.running:
            with self.lock:
                job = self.queue[0] if self.queue and not self.paused.is_set() else None
            if job is None:
                time.sleep(0.005)
                continue
            pid, graph, client_id = job
            self.run_prompt(pid, graph, client_id)
            with self.lock:
                if self.queue and self.queue[0][0] == pid:
                    self.queue.pop(0)

    def run_prompt(self, pid, graph, client_id):
        ids = {n["class_type"]: k for k, n in graph.items()}
        loader = graph[ids["LoadVideo"]]["inputs"]["file"]
        question = graph[ids["VANSNextEventCaption"]]["inputs"]["question"]
        self.send(client_id, {"type": "execution_start", "data": {"prompt_id": pid}})
        self.send_raw(client_id, ws_frame(0x9, b"hello"))  # a ping: the client must answer
        self.send_raw(client_id, ws_frame(0x2, b"\x00\x00\x00\x01JPEGDATA"))  # a binary preview: skipped
        text = json.dumps({"type": "executing", "data": {"node": ids["KSampler"], "prompt_id": pid}}).encode()
        self.send_raw(client_id, ws_frame(0x1, text[:10], fin=False) + ws_frame(0x0, text[10:]))  # fragmented
        for step in (1, 2):
            self.send(client_id, {"type": "progress", "data": {"value": step, "max": 2, "prompt_id": pid,
                                                                "node": ids["KSampler"]}})
        time.sleep(self.delay)
        if question.startswith("HANG"):  # a prompt that never ends by itself: only /interrupt stops it
            self.interrupt.clear()
            self.interrupt.wait(30)
        if not self.running:
            return
        if question.startswith("HANG"):
            entry = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                               "messages": [["execution_interrupted", {"prompt_id": pid}]]}}
            event = ("execution_interrupted", {"prompt_id": pid})
        elif self.inputs.get(loader, b"").startswith(b"CORRUPT"):
            error = {"prompt_id": pid, "node_id": ids["LoadVideo"], "node_type": "LoadVideo",
                     "exception_message": f"[Errno 1094995529] Invalid data found when processing input: '{loader}'",
                     "exception_type": "av.error.InvalidDataError", "traceback": []}
            entry = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                               "messages": [["execution_start", {}], ["execution_error", error]]}}
            event = ("execution_error", error)
        else:
            prefix = graph[ids["SaveVideo"]]["inputs"]["filename_prefix"]
            name = f"{prefix.split('/')[-1]}_00001_.mp4"
            self.outputs[name] = b"MP4" + question.encode()
            entry = {"outputs": {ids["VANSNextEventCaption"]: {"text": [f"caption of {question}"]},
                                 ids["SaveVideo"]: {"images": [{"filename": name, "subfolder": prefix.split("/")[0],
                                                                "type": "output"}], "animated": [True]}},
                     "status": {"status_str": "success", "completed": True, "messages": []}}
            event = ("execution_success", {"prompt_id": pid})
        with self.lock:
            if not self.running:
                return
            self.history[pid] = entry
            self.executed.append(pid)
            self.questions.append(question)
        self.send(client_id, {"type": "executing", "data": {"node": None, "prompt_id": pid}})
        self.send(client_id, {"type": event[0], "data": event[1]})
        if self.on_executed:
            self.on_executed(self)


def parse_upload(body: bytes, content_type: str) -> tuple[str, bytes]:
    boundary = content_type.split("boundary=")[1].encode()
    for part in body.split(b"--" + boundary):
        head, _, content = part.partition(b"\r\n\r\n")
        if b'name="image"' in head:
            name = head.split(b'filename="')[1].split(b'"')[0].decode()
            return name, content[:-2]
    raise AssertionError("no image part")


@pytest.fixture
def fake():
    server = FakeComfy().start()
    yield server
    if server.running:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

FAST = dict(backoff=0.02, max_backoff=0.1, poll=0.2, server_timeout=5.0)


def make_items(tmp_path: Path, n: int, corrupt: tuple[int, ...] = (), invalid: tuple[int, ...] = (),
               partial: tuple[int, ...] = (), hang: tuple[int, ...] = ()) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        path = videos / f"clip{i}.mp4"
        path.write_bytes((b"CORRUPT" if i in corrupt else b"VIDEO") + bytes([i]) * 50)
        question = ("INVALID " if i in invalid else "PARTIAL " if i in partial else "HANG " if i in hang else "") + \
            f"What happens next in clip {i}?"
        lines.append(json.dumps({"id": f"item{i}", "video": f"videos/{path.name}", "question": question}))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def run_batch(manifest: Path, out: Path, servers: list[str], **settings) -> tuple[dict, BatchRunner]:
    settings = BatchSettings(servers=servers, **{**FAST, **settings})
    template = WorkflowTemplate.build(load_workflow(), overrides=parse_set(["KSampler.steps=2"]))
    runner = BatchRunner(load_manifest(manifest), template, out, settings, quiet=True)
    return runner.run(), runner


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def test_manifest_csv_with_vans_columns_and_bom(tmp_path):
    csv_text = ("\ufeffoutput_video_path,input_video_path,ENG_Instruction,ENG_Think,ENG_GT_Caption\n"
                "gt/a.mp4,in/a.mp4,What next?,thinking,He cuts the onion.\n"
                "/abs/gt_b.mp4,/abs/b.mp4,\"Then, what?\",t,She stirs.\n")
    path = tmp_path / "vans.csv"
    path.write_text(csv_text, encoding="utf-8")
    items = load_manifest(path)
    assert [i.question for i in items] == ["What next?", "Then, what?"]
    assert items[0].video == str((tmp_path / "in/a.mp4").resolve())
    assert items[0].gt_video == str((tmp_path / "gt/a.mp4").resolve())
    assert items[1].video == "/abs/b.mp4" and items[1].ground_truth == "She stirs."
    assert items[0].id == item_id("in/a.mp4", "What next?") and len(items[0].id) == 12
    assert load_manifest(path)[0].id == items[0].id  # stable across reads: resume finds the same ids


def test_manifest_jsonl_ids_seed_and_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": 7, "video": "a.mp4", "question": "q", "seed": "3", "split": "procedural"}\n\n'
                    '{"video": "b.mp4", "question": "q2", "ground_truth": "gt"}\n', encoding="utf-8")
    a, b = load_manifest(path)
    assert (a.id, a.seed, a.split, b.ground_truth) == ("7", 3, "procedural", "gt")
    path.write_text('{"id": "x", "video": "a.mp4", "question": "q"}\n{"id": "x", "video": "b.mp4", "question": "q"}\n')
    with pytest.raises(InputError, match="share the id x"):
        load_manifest(path)
    path.write_text('{"video": "a.mp4"}\n')
    with pytest.raises(InputError, match="row 1 has no question"):
        load_manifest(path)
    path.write_text('{"video": "a.mp4", "question": "q"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        load_manifest(path)
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------
# Workflow filling
# ---------------------------------------------------------------------------------------------


def node_of(graph, class_type):
    (node,) = [n for n in graph.values() if n["class_type"] == class_type]
    return node


def test_fill_the_shipped_workflow_by_class_and_title():
    shipped = load_workflow()
    template = WorkflowTemplate.build(shipped, overrides=parse_set(
        ["KSampler.steps=2", "VANS Context Conditioning.width=64", "CLIPLoader.type=\"wan\""]))
    item = batch.Item(id="a/b c", video="x.mp4", question="What next?", seed=5)
    graph = template.fill(item, "vans_batch_abc.mp4")
    assert node_of(graph, "LoadVideo")["inputs"]["file"] == "vans_batch_abc.mp4"
    assert node_of(graph, "VANSNextEventCaption")["inputs"]["question"] == "What next?"
    assert node_of(graph, "VANSNextEventCaption")["inputs"]["seed"] == 5
    assert node_of(graph, "KSampler")["inputs"]["seed"] == 5 and node_of(graph, "KSampler")["inputs"]["steps"] == 2
    assert node_of(graph, "VANSContextConditioning")["inputs"]["width"] == 64
    assert node_of(graph, "SaveVideo")["inputs"]["filename_prefix"] == f"vans_batch/{batch.safe_name('a/b c')}"
    assert "/" not in batch.safe_name("a/b c") and batch.safe_name("a/b c") != batch.safe_name("a_b c")
    assert node_of(shipped, "KSampler")["inputs"]["steps"] == 50  # the loaded workflow is not changed
    # numbering does not matter: the same workflow with other node ids fills the same way
    renumbered = {f"n{k}": v for k, v in shipped.items()}
    for node in renumbered.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = [f"n{value[0]}", value[1]]
    graph = WorkflowTemplate.build(renumbered).fill(item, "v.mp4")
    assert node_of(graph, "LoadVideo")["inputs"]["file"] == "v.mp4"


def test_workflow_with_several_video_loaders_needs_a_title():
    graph = load_workflow("reward_scoring")
    with pytest.raises(InputError, match="3 LoadVideo/VHS_LoadVideo nodes.*--video-node"):
        WorkflowTemplate.build(graph)
    template = WorkflowTemplate.build(graph, video_node="Load Video (question video)")
    filled = template.fill(batch.Item(id="i", video="v", question="q"), "up.mp4")
    titled = {n["_meta"]["title"]: n for n in filled.values()}
    assert titled["Load Video (question video)"]["inputs"]["file"] == "up.mp4"
    assert titled["Load Video (answer video)"]["inputs"]["file"] != "up.mp4"
    with pytest.raises(InputError, match="no node has class or title 'Nope'"):
        WorkflowTemplate.build(load_workflow(), overrides=parse_set(["Nope.steps=2"]))
    with pytest.raises(InputError, match="KEY.input=VALUE"):
        parse_set(["steps=2"])


# ---------------------------------------------------------------------------------------------
# Results and resume bookkeeping
# ---------------------------------------------------------------------------------------------


def test_result_store_last_record_wins_and_compacts(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    store.add({"id": "b", "status": "gave_up"})
    store.add({"id": "a", "status": "error"})
    store.add({"id": "b", "status": "ok"})
    with open(store.path, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "stat')  # a crash mid-line
    again = ResultStore(store.path)
    assert {k: v["status"] for k, v in again.records.items()} == {"a": "error", "b": "ok"}
    assert again.is_done("b") and again.is_done("a") and not again.is_done("a", retry_failed=True)
    assert not again.is_done("c")
    again.compact(["a", "b", "z"])
    assert [json.loads(line)["id"] for line in store.path.read_text().splitlines()] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# The client against the fake server
# ---------------------------------------------------------------------------------------------


def test_batch_completes_downloads_and_resumes(tmp_path, fake):
    manifest = make_items(tmp_path, 5)
    out = tmp_path / "out"
    counts, _ = run_batch(manifest, out, [fake.url], in_flight=2)
    assert counts == {"ok": 5}
    rows = results(out)
    assert [r["id"] for r in rows] == [f"item{i}" for i in range(5)]
    for i, r in enumerate(rows):
        assert r["status"] == "ok" and r["error"] == "" and r["attempts"] == 1
        assert r["caption"] == f"caption of What happens next in clip {i}?"
        assert r["video"] == f"videos/item{i}.mp4"
        assert (out / r["video"]).read_bytes() == b"MP4" + r["question"].encode()
        assert r["seconds"] > 0 and r["server"] == fake.url
        assert r["vlm"] == {"system_prompt": "official", "decoding": "official"}  # what the caption node ran with
        assert r["input_video"] == str((tmp_path / "videos" / f"clip{i}.mp4").resolve())
    assert fake.pongs >= 5  # the client answered the server's pings
    assert sorted(fake.inputs) == sorted({f"vans_batch_{hashlib.sha1(p.read_bytes()).hexdigest()[:16]}.mp4"
                                          for p in (tmp_path / "videos").iterdir()})
    # rerun: nothing is sent again
    executed = len(fake.executed)
    counts, _ = run_batch(manifest, out, [fake.url])
    assert counts == {"ok": 5} and len(fake.executed) == executed
    # a new row in the manifest: only that one runs
    with open(manifest, "a", encoding="utf-8") as f:
        (tmp_path / "videos" / "new.mp4").write_bytes(b"VIDEO-new")
        f.write(json.dumps({"id": "new", "video": "videos/new.mp4", "question": "And then?"}) + "\n")
    counts, _ = run_batch(manifest, out, [fake.url])
    assert counts == {"ok": 6} and len(fake.executed) == executed + 1
    assert len(results(out)) == 6


def test_transient_errors_are_retried_with_backoff(tmp_path, fake):
    manifest = make_items(tmp_path, 2)
    fake.fail_posts = 2
    t0 = time.monotonic()
    counts, _ = run_batch(manifest, tmp_path / "out", [fake.url], in_flight=1, backoff=0.2, max_backoff=1.0)
    elapsed = time.monotonic() - t0
    assert counts == {"ok": 2}
    # two 503 answers: two extra attempts in all, each after at least the first backoff delay
    assert sum(r["attempts"] for r in results(tmp_path / "out")) == 2 + 2
    assert elapsed >= 0.2


def test_retries_are_bounded_and_a_rerun_resumes(tmp_path, fake):
    manifest = make_items(tmp_path, 2)
    fake.fail_posts = 100
    counts, _ = run_batch(manifest, tmp_path / "out", [fake.url], in_flight=1, retries=2)
    assert counts == {"gave_up": 2}
    rows = results(tmp_path / "out")
    assert all(r["attempts"] == 3 and "HTTP 503" in r["error"] for r in rows), rows
    fake.fail_posts = 0
    counts, _ = run_batch(manifest, tmp_path / "out", [fake.url])
    assert counts == {"ok": 2}


def test_validation_and_execution_errors_fail_their_item_alone(tmp_path, fake):
    manifest = make_items(tmp_path, 5, corrupt=(1,), invalid=(2,), partial=(4,))
    out = tmp_path / "out"
    counts, _ = run_batch(manifest, out, [fake.url], in_flight=2)
    assert counts == {"ok": 2, "error": 3}
    rows = {r["id"]: r for r in results(out)}
    assert rows["item0"]["status"] == rows["item3"]["status"] == "ok"
    assert rows["item1"]["status"] == "error" and rows["item1"]["attempts"] == 1
    assert "LoadVideo" in rows["item1"]["error"] and "Invalid data found when processing input" in rows["item1"]["error"]
    assert rows["item2"]["status"] == "error"
    assert "Prompt outputs failed validation" in rows["item2"]["error"]
    assert "question: the question is empty" in rows["item2"]["error"]
    # HTTP 200 with node_errors: ComfyUI would run only the valid outputs (no answer video); the item fails
    assert rows["item4"]["status"] == "error" and "must be between 1 and 3" in rows["item4"]["error"]
    assert rows["item4"]["prompt_id"] == "" and len(fake.deleted) == 1  # and the partial prompt is withdrawn
    executed = len(fake.executed)
    run_batch(manifest, out, [fake.url])  # failed items are not retried by default ...
    assert len(fake.executed) == executed
    run_batch(manifest, out, [fake.url], retry_failed=True)  # ... only when asked
    ran = Counter(fake.questions)
    assert ran["What happens next in clip 1?"] == 2 and ran["What happens next in clip 0?"] == 1
    assert not any(q.startswith("INVALID") for q in ran)  # refused each time, never run


def test_a_hung_prompt_times_out_alone_and_is_interrupted(tmp_path, fake):
    manifest = make_items(tmp_path, 3, hang=(1,))
    out = tmp_path / "out"
    started = time.monotonic()
    counts, _ = run_batch(manifest, out, [fake.url], in_flight=1, item_timeout=0.5)
    assert time.monotonic() - started < 20  # not the 30 s the fake would hang for
    assert counts == {"ok": 2, "error": 1}
    rows = {r["id"]: r for r in results(out)}
    assert "timed out" in rows["item1"]["error"] and "--item-timeout" in rows["item1"]["error"]
    assert fake.interrupts == [rows["item1"]["prompt_id"]]  # interrupted on the server, by its id
    assert rows["item2"]["status"] == "ok"  # the items after it still ran


def test_survives_a_server_restart_mid_batch(tmp_path, fake):
    manifest = make_items(tmp_path, 8)
    fake.delay = 0.1
    restarted = threading.Event()

    def restart_after_three(server):
        if len(server.executed) == 3 and not restarted.is_set():
            restarted.set()
            port = server.port
            threading.Thread(target=lambda: (server.stop(), time.sleep(0.8), relaunch(server, port)),
                             daemon=True).start()

    def relaunch(server, port):
        server.port = port
        server.start()

    fake.on_executed = restart_after_three
    out = tmp_path / "out"
    counts, _ = run_batch(manifest, out, [fake.url], in_flight=3, retries=3, backoff=0.1)
    assert restarted.is_set()
    assert counts == {"ok": 8}
    rows = results(out)
    assert sorted(r["id"] for r in rows) == [f"item{i}" for i in range(8)]  # each exactly once
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"item{i}.mp4" for i in range(8)]
    assert any(r["attempts"] > 1 for r in rows)  # the prompts queued at the restart were lost and resent


def test_gives_up_on_a_dead_server_and_resumes_later(tmp_path, fake):
    manifest = make_items(tmp_path, 4)
    # in_flight=1: the third prompt runs only after the first two were collected; it dies with the server
    fake.on_executed = lambda server: len(server.executed) == 3 and threading.Thread(target=server.stop).start()
    out = tmp_path / "out"
    counts, _ = run_batch(manifest, out, [fake.url], in_flight=1, server_timeout=0.5)
    assert counts["ok"] == 2 and counts["gave_up"] == 2
    assert all("no server reachable" in r["error"] or "went away" in r["error"] or "lost" in r["error"]
               for r in results(out) if r["status"] == "gave_up")
    again = FakeComfy().start()
    try:
        counts, _ = run_batch(manifest, out, [again.url])
        assert counts == {"ok": 4} and len(again.executed) == 2
    finally:
        again.stop()


def test_items_spread_over_two_servers(tmp_path):
    servers = [FakeComfy(delay=0.1).start(), FakeComfy(delay=0.1).start()]
    try:
        manifest = make_items(tmp_path, 8)
        counts, _ = run_batch(manifest, tmp_path / "out", [s.url for s in servers], in_flight=1)
        assert counts == {"ok": 8}
        by_server = {s.url: sum(r["server"] == s.url for r in results(tmp_path / "out")) for s in servers}
        assert all(n >= 2 for n in by_server.values()), by_server
        assert sum(len(s.executed) for s in servers) == 8
    finally:
        for s in servers:
            s.stop()


def test_command_line(tmp_path, fake, capsys):
    from vans.__main__ import main

    manifest = make_items(tmp_path, 2, corrupt=(1,))
    rc = main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--server", fake.url, "--set",
               "KSampler.steps=1", "--backoff", "0.05"])
    captured = capsys.readouterr()
    assert rc == 1  # one item failed
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["ok"] == 1 and summary["error"] == 1
    assert "batch: 2 to run, 0 already done" in captured.err
    assert "[2/2]" in captured.err and "item1" in captured.err
    rc = main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--server", "ftp://x"])
    assert rc == 2 and "not an http URL" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Failure paths that used to lose an item or kill a worker
# ---------------------------------------------------------------------------------------------


def run_bounded(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread; fails the test (instead of hanging it) when it does not return in time."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=fn(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds} s (hung)"
    assert "value" in box, "it raised (see the thread's traceback above)"
    return box["value"]


def test_a_malformed_prompt_reply_is_retried_and_never_loses_the_item(tmp_path):
    servers = [FakeComfy(delay=0.05).start(), FakeComfy(delay=0.05).start()]
    servers[0].garbled_posts = 1  # its first /prompt answers 200 with a body that is not JSON
    try:
        manifest = make_items(tmp_path, 4)
        counts, _ = run_bounded(30, run_batch, manifest, tmp_path / "out", [s.url for s in servers], in_flight=1)
        assert counts == {"ok": 4}
        rows = results(tmp_path / "out")
        assert sorted(r["id"] for r in rows) == [f"item{i}" for i in range(4)]
        assert sum(r["attempts"] for r in rows) == 4 + 1  # the garbled answer cost one retry of one item
        assert servers[0].garbled_posts == 0
    finally:
        for s in servers:
            s.stop()


def test_garbled_replies_are_bounded_by_retries_and_an_unreadable_video_fails_its_item(tmp_path, fake, monkeypatch):
    manifest = make_items(tmp_path, 2)
    fake.garbled_posts = 100
    counts, _ = run_bounded(30, run_batch, manifest, tmp_path / "out", [fake.url], in_flight=1, retries=1)
    assert counts == {"gave_up": 2}
    assert all(r["attempts"] == 2 and "not JSON" in r["error"] for r in results(tmp_path / "out"))
    fake.garbled_posts = 0
    unreadable, read_bytes = tmp_path / "videos" / "clip1.mp4", Path.read_bytes

    def failing_read(path):  # the file exists but cannot be read (as root, chmod would not stop the read)
        if path == unreadable:
            raise PermissionError(13, "Permission denied")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    counts, _ = run_bounded(30, run_batch, manifest, tmp_path / "out2", [fake.url], in_flight=1)
    assert counts == {"ok": 1, "error": 1}
    (row,) = [r for r in results(tmp_path / "out2") if r["id"] == "item1"]
    assert "cannot be read" in row["error"] and row["attempts"] == 1


class StubSocket:
    def __init__(self, messages):
        self.messages = list(messages)

    def recv(self, timeout):
        return self.messages.pop(0) if self.messages else None

    def close(self):
        pass


class StubClient:
    """A ComfyClient stand-in: a fixed history, and a log of withdrawn prompt ids."""

    url = "http://stub:1"

    def __init__(self, history=None):
        self.entries = history or {}
        self.withdrawn = []

    def history(self, prompt_id):
        return self.entries.get(prompt_id)

    def withdraw(self, prompt_id):
        self.withdrawn.append(prompt_id)


def test_a_prompt_that_ends_as_it_times_out_is_recorded_once(tmp_path):
    manifest = make_items(tmp_path, 1)
    settings = BatchSettings(servers=[StubClient.url], item_timeout=1.0, **FAST)
    runner = BatchRunner(load_manifest(manifest), WorkflowTemplate.build(load_workflow()), tmp_path / "out",
                         settings, quiet=True)
    client = StubClient({"p1": {"outputs": {}, "status": {"status_str": "success", "completed": True}}})
    worker = batch._ServerWorker(runner, client)
    job = runner.scheduler.take()
    job.prompt_id, job.server, job.started = "p1", client.url, time.monotonic() - 10  # past --item-timeout
    worker.inflight["p1"] = job
    # the websocket reports the end in the same step in which the timeout check removes the prompt
    worker.ws = StubSocket([json.dumps({"type": "execution_success", "data": {"prompt_id": "p1"}})])
    worker._wait()
    assert not worker.inflight and client.withdrawn == ["p1"]
    assert runner.scheduler.finished()  # accounted for exactly once
    (row,) = results(tmp_path / "out")
    assert row["status"] == "error" and "timed out" in row["error"]


def submit_directly(server: FakeComfy, manifest: Path, index: int) -> str:
    """Queue item ``index`` on ``server`` as the batch would, outside any run: the prompt of a killed client."""
    item = load_manifest(manifest)[index]
    client = batch.ComfyClient(server.url)
    name = client.upload(Path(item.video), f"direct_{index}.mp4")
    template = WorkflowTemplate.build(load_workflow(), overrides=parse_set(["KSampler.steps=2"]))
    return client.queue_prompt(template.fill(item, name), "killed-client")


def submitted_record(item: str, server: str, prompt_id: str) -> dict:
    return {"id": item, "status": "submitted", "server": server, "prompt_id": prompt_id, "attempts": 1}


def test_a_rerun_collects_prompts_a_killed_client_left_on_the_server(tmp_path, fake):
    manifest = make_items(tmp_path, 4)
    out = tmp_path / "out"
    store = ResultStore(out / "results.jsonl")
    fake.paused.set()
    done_id = submit_directly(fake, manifest, 0)
    queued_id = submit_directly(fake, manifest, 1)
    fake.on_executed = lambda server: server.paused.set()  # run item0's prompt only
    fake.paused.clear()
    deadline = time.monotonic() + 10
    while done_id not in fake.executed and time.monotonic() < deadline:
        time.sleep(0.01)
    fake.on_executed = None
    assert done_id in fake.executed and queued_id not in fake.executed
    threading.Timer(0.5, fake.paused.clear).start()  # item1's prompt stays queued until the rerun is under way
    store.add(submitted_record("item0", fake.url, done_id))  # finished while no client was there
    store.add(submitted_record("item1", fake.url, queued_id))  # still queued
    store.add(submitted_record("item2", fake.url, "unknown-to-the-server"))  # lost: submitted again
    store.add(submitted_record("item3", "http://127.0.0.1:9", "elsewhere"))  # a server not in this run
    assert not store.is_done("item0") and not ResultStore(store.path).is_done("item0")
    fake.posts.clear()
    counts, _ = run_bounded(30, run_batch, manifest, out, [fake.url], in_flight=2)
    assert counts == {"ok": 4}
    rows = {r["id"]: r for r in results(out)}
    assert rows["item0"]["prompt_id"] == done_id and rows["item1"]["prompt_id"] == queued_id
    assert (out / rows["item1"]["video"]).read_bytes() == b"MP4What happens next in clip 1?"
    assert sorted(fake.posts) == ["What happens next in clip 2?", "What happens next in clip 3?"]  # no resubmission
    assert len(results(out)) == 4  # compacted: no submitted lines left


def test_submitted_records_are_written_and_ctrl_c_withdraws_the_prompts(tmp_path, fake):
    manifest = make_items(tmp_path, 3, hang=(0, 1, 2))
    out = tmp_path / "out"

    class Interrupted(BatchRunner):
        def _join(self, threads):  # Ctrl-C arrives once two prompts are on the server
            deadline = time.monotonic() + 10
            while len(fake.posts) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            raise KeyboardInterrupt

    settings = BatchSettings(servers=[fake.url], in_flight=2, **FAST)
    template = WorkflowTemplate.build(load_workflow(), overrides=parse_set(["KSampler.steps=2"]))
    runner = Interrupted(load_manifest(manifest), template, out, settings, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    rows = results(out)
    assert [r["status"] for r in rows] == ["submitted", "submitted"]  # compacted: one line per item
    ids = {r["prompt_id"] for r in rows}
    assert len(ids) == 2 and all(r["server"] == fake.url for r in rows)
    assert ids <= fake.deleted and ids <= set(fake.interrupts)  # withdrawn from the queue, interrupted if running
    assert len(fake.posts) == 2  # nothing was submitted after the interrupt


def test_evaluation_counts_a_submitted_item_as_not_finished(tmp_path):
    from vans.evaluate import match

    store = ResultStore(tmp_path / "results.jsonl")
    store.add({"id": "a", "status": "ok", "caption": "He cuts it.", "question": "q", "input_video": "a.mp4"})
    store.add({"id": "b", "status": "ok", "caption": "old answer", "question": "q", "input_video": "b.mp4"})
    store.add({**submitted_record("b", "http://127.0.0.1:8188", "p"), "question": "q", "input_video": "b.mp4"})
    truth = [batch.Item(id=i, video=f"{i}.mp4", question="q", ground_truth="He cuts the onion.") for i in "ab"]
    pairs, left_out = match(store.path, truth)
    assert [p.id for p in pairs] == ["a"] and left_out == {"not_ok": 1, "no_ground_truth": 0, "missing": 0}
