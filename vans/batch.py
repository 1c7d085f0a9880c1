"""Batch answering through the ComfyUI HTTP API: ``python -m vans batch MANIFEST --out DIR``.

For each manifest row (a video and a question) the shipped API-format workflow (``workflows/api/vnep.json``
unless ``--workflow`` names another) is filled in, queued on a ComfyUI server and its outputs are
downloaded into ``DIR``:

* ``DIR/results.jsonl``: one line per item (``id, question, input_video, caption, think, video, seconds,
  status, error, server, prompt_id, attempts``); ``video`` is relative to ``DIR``;
* ``DIR/videos/<id>.mp4``: the answer video(s) (``<id>_<k>.mp4`` when the workflow saves several).

Manifest: CSV or JSONL with the columns ``video`` and ``question`` (the VANS CSV names
``input_video_path`` / ``ENG_Instruction`` are understood too), optional ``id`` (default: a hash of video
and question, so reruns find the same ids), ``ground_truth`` (``ENG_GT_Caption``), ``gt_video``
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

import base64
import copy
import csv
import hashlib
import http.client
import json
import os
import re
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import InputError

DEFAULT_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "api" / "vnep.json"
DEFAULT_SERVER = "http://127.0.0.1:8188"
RESULTS_NAME = "results.jsonl"
VIDEO_DIR = "videos"
CAPTION_CLASS = "VANSNextEventCaption"
VIDEO_LOADERS = {"LoadVideo": "file", "VHS_LoadVideo": "video"}  # class -> input holding the file name
OUTPUT_KEYS = ("images", "videos", "gifs")  # ui keys under which output nodes list saved files
DONE = "ok"
FAILED = "error"  # the item itself is bad (validation or execution error): not retried unless asked
GAVE_UP = "gave_up"  # transient failures exhausted the retries: retried on the next run
SUBMITTED = "submitted"  # queued on ``server`` as ``prompt_id``, not collected yet: a rerun collects it there

# Manifest column -> accepted names (first found wins), VANS CSV names included.
COLUMNS = {
    "id": ("id", "item_id"),
    "video": ("video", "input_video", "input_video_path", "video_path"),
    "question": ("question", "ENG_Instruction", "instruction"),
    "ground_truth": ("ground_truth", "gt", "ENG_GT_Caption", "caption_gt"),
    "gt_video": ("gt_video", "output_video_path", "target_video"),
    "split": ("split", "task"),
    "seed": ("seed",),
}


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    video: str
    question: str
    ground_truth: str | None = None
    gt_video: str | None = None
    split: str | None = None
    seed: int | None = None


def item_id(video: str, question: str) -> str:
    """Stable id of an item without one: 12 hex digits of sha1(video, question)."""
    return hashlib.sha1(f"{video}\n{question}".encode("utf-8")).hexdigest()[:12]


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"manifest {path} line {number} is not JSON ({exc.msg}); fix that line") from None
            if not isinstance(row, dict):
                raise InputError(f"manifest {path} line {number} is not a JSON object; write one object per line")
            rows.append(row)
        return rows
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig drops the VANS CSV's BOM
        return [dict(row) for row in csv.DictReader(f)]


def _pick(row: dict, name: str):
    for key in COLUMNS[name]:
        value = row.get(key)
        if value not in (None, ""):
            return value
    return None


def load_manifest(path: str | os.PathLike, *, resolve_videos: bool = True) -> list[Item]:
    """Items of a CSV or JSONL manifest (see the module doc for the columns). Ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist; pass a CSV or JSONL file")
    items, seen = [], {}
    for number, row in enumerate(_read_rows(path), start=1):
        video, question = _pick(row, "video"), _pick(row, "question")
        if video is None or question is None:
            missing = "video" if video is None else "question"
            raise InputError(f"manifest {path} row {number} has no {missing} (columns {', '.join(COLUMNS[missing])})")
        video, question = str(video), str(question)
        ident = str(_pick(row, "id") or item_id(video, question))
        if ident in seen:
            raise InputError(f"manifest {path} rows {seen[ident]} and {number} share the id {ident}; make ids unique")
        seen[ident] = number
        seed = _pick(row, "seed")
        try:
            seed = None if seed is None else int(seed)
        except ValueError:
            raise InputError(f"manifest {path} row {number} has seed {seed!r}; use an integer") from None
        gt_video = _pick(row, "gt_video")
        if resolve_videos:
            video = _resolve(path, video)
            gt_video = _resolve(path, gt_video) if gt_video else None
        items.append(Item(id=ident, video=video, question=question, ground_truth=_opt_str(_pick(row, "ground_truth")),
                          gt_video=gt_video, split=_opt_str(_pick(row, "split")), seed=seed))
    if not items:
        raise InputError(f"manifest {path} has no rows; add one row per video and question")
    return items


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


def _resolve(manifest: Path, video: str) -> str:
    p = Path(video)
    return str(p if p.is_absolute() else (manifest.parent / p).resolve())


def safe_name(ident: str) -> str:
    """A file-name-safe form of an id; ids that had to change get a hash so two never collide."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", ident)[:80]
    return clean if clean == ident else f"{clean}_{hashlib.sha1(ident.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# Workflow
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Transport: HTTP and a minimal websocket
# ---------------------------------------------------------------------------------------------


class ServerUnavailable(Exception):
    """The server could not be reached or answered 5xx: retry later."""


class PromptRejected(Exception):
    """``/prompt`` refused the graph (validation error): the item fails with this message."""


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    """A minimal RFC 6455 client: handshake, text messages in, ping answered, masked close out."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            data += chunk
        head, self._buf = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            self.close()
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            self.close()
            raise ConnectionError("websocket handshake: bad Sec-WebSocket-Accept")
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0

    def _frame(self):
        """One complete frame from the buffer, or None if it is not all here yet."""
        buf = self._buf
        if len(buf) < 2:
            return None
        fin, opcode = buf[0] & 0x80, buf[0] & 0x0F
        masked, length, pos = buf[1] & 0x80, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, pos = struct.unpack(">H", buf[2:4])[0], 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, pos = struct.unpack(">Q", buf[2:10])[0], 10
        mask = b""
        if masked:
            mask, pos = buf[pos:pos + 4], pos + 4
        if len(buf) < pos + length:
            return None
        payload = buf[pos:pos + length]
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._buf = buf[pos + length:]
        return bool(fin), opcode, payload

    def recv(self, timeout: float) -> str | None:
        """The next text message, or None when none completes within ``timeout``; ConnectionError on close."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is not None:
                message = self._handle(*frame)
                if message is not None:
                    return message
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as exc:
                raise ConnectionError(f"websocket: {exc}") from None
            if not chunk:
                raise ConnectionError("websocket closed by the server")
            self._buf += chunk

    def _handle(self, fin: bool, opcode: int, payload: bytes) -> str | None:
        if opcode == 0x8:
            raise ConnectionError("websocket closed by the server")
        if opcode == 0x9:
            self._send(0xA, payload)
            return None
        if opcode == 0xA:
            return None
        if opcode in (0x1, 0x2):
            self._fragment_opcode, self._fragments = opcode, [payload]
        elif opcode == 0x0:
            self._fragments.append(payload)
        if not fin:
            return None
        data, kind = b"".join(self._fragments), self._fragment_opcode
        self._fragments = []
        return data.decode("utf-8", errors="replace") if kind == 0x1 else None  # binary: previews, skipped

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        head = bytes([0x80 | opcode])
        n = len(payload)
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                                   else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"a reply that is not JSON ({exc.msg})"
    if isinstance(exc, KeyError):
        return f"a reply without the key {exc}"
    return f"{type(exc).__name__}: {exc}"


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                            http.client.HTTPException, OSError))


class ComfyClient:
    """ComfyUI's HTTP API through urllib. Connection problems and 5xx raise ``ServerUnavailable``."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server {url!r} is not an http URL; use e.g. {DEFAULT_SERVER}")
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        except Exception as exc:  # noqa: BLE001 - every transport failure is "try again later"
            if _transient(exc):
                raise ServerUnavailable(f"{self.url}: {getattr(exc, 'reason', exc)}") from None
            raise
        if status >= 500:
            raise ServerUnavailable(f"{self.url}{path}: HTTP {status} {data[:200].decode(errors='replace')}")
        return status, data

    def get_json(self, path: str):
        status, data = self.request("GET", path)
        if status != 200:
            raise ServerUnavailable(f"{self.url}{path}: HTTP {status}")
        return json.loads(data or b"null")

    def upload(self, path: Path, name: str) -> str:
        """POST /upload/image (any file, overwrite): returns the name the server stored it under."""
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in (("type", "input"), ("overwrite", "true"))]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + Path(path).read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, data = self.request("POST", "/upload/image", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise PromptRejected(f"upload of {path} refused: HTTP {status} {data[:300].decode(errors='replace')}")
        answer = json.loads(data)
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue_prompt(self, graph: dict, client_id: str) -> str:
        body = json.dumps({"prompt": graph, "client_id": client_id}).encode()
        status, data = self.request("POST", "/prompt", body, {"Content-Type": "application/json"})
        if status != 200:
            raise PromptRejected(validation_message(status, data))
        answer = json.loads(data)
        if answer.get("node_errors"):  # queued, but the outputs behind the failing nodes would not run
            self.withdraw(answer["prompt_id"])
            raise PromptRejected(validation_message(status, data))
        return answer["prompt_id"]

    def withdraw(self, prompt_id: str) -> None:
        """Take a prompt off the server: out of its queue, or interrupted if it is running."""
        for path, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
            except ServerUnavailable:
                pass

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def queued_ids(self) -> set[str]:
        queue = self.get_json("/queue")
        return {entry[1] for key in ("queue_running", "queue_pending") for entry in queue.get(key, [])}

    def view(self, entry: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": entry["filename"], "subfolder": entry.get("subfolder", ""),
                                        "type": entry.get("type", "output")})
        status, data = self.request("GET", f"/view?{query}")
        if status != 200:
            raise ServerUnavailable(f"{self.url}/view {entry['filename']}: HTTP {status}")
        return data

    def websocket(self, client_id: str) -> WebSocket:
        if self.ws_scheme != "ws":
            raise InputError(f"server {self.url}: only plain http/ws is supported; use http://")
        try:
            return WebSocket(self.host, self.port, f"/ws?clientId={client_id}", timeout=self.timeout)
        except (OSError, ConnectionError) as exc:
            raise ServerUnavailable(f"{self.url}: websocket: {exc}") from None


def validation_message(status: int, data: bytes) -> str:
    """The server's own words for a refused prompt, on one line."""
    try:
        answer = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"HTTP {status}: {data[:500].decode(errors='replace')}"
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    default = "some outputs failed validation" if status == 200 else f"HTTP {status}"
    text = error.get("message", default) if isinstance(error, dict) else str(error)
    if isinstance(error, dict) and error.get("details"):
        text += f": {error['details']}"
    for nid, info in (answer.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            text += f"; node {nid} ({info.get('class_type', '?')}): {err.get('message', '')}"
            if err.get("details"):
                text += f": {err['details']}"
    return " ".join(text.split())


def execution_message(history: dict) -> tuple[str, str]:
    """(kind, message) of a finished prompt that did not succeed: kind 'error' or 'interrupted'."""
    for event, data in history.get("status", {}).get("messages", []):
        if event == "execution_error":
            message = (f"{data.get('node_type', '?')} (node {data.get('node_id', '?')}): "
                       f"{data.get('exception_type', 'error')}: {data.get('exception_message', '')}")
            return "error", " ".join(message.split())
        if event == "execution_interrupted":
            return "interrupted", f"interrupted at {data.get('node_type', '?')} (node {data.get('node_id', '?')})"
    return "error", f"prompt ended with status {history.get('status', {}).get('status_str', '?')}"


# ---------------------------------------------------------------------------------------------
# Results (resume bookkeeping)
# ---------------------------------------------------------------------------------------------


class ResultStore:
    """``results.jsonl``: appended as items finish (crash-safe), compacted at the end; the last record of an
    id wins. A line cut short by a crash is ignored."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    self.records[str(record["id"])] = record

    def is_done(self, ident: str, retry_failed: bool = False) -> bool:
        status = self.records.get(ident, {}).get("status")
        return status == DONE or (status == FAILED and not retry_failed)

    def add(self, record: dict) -> None:
        with self._lock:
            self.records[record["id"]] = record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()

    def compact(self, order: Iterable[str]) -> None:
        """Rewrite with one line per id: manifest order first, then ids no longer in the manifest."""
        with self._lock:
            order = [i for i in order if i in self.records]
            rest = [i for i in self.records if i not in set(order)]
            temp = self.path.with_name(self.path.name + ".tmp")
            temp.write_text("".join(json.dumps(self.records[i], ensure_ascii=False) + "\n" for i in order + rest),
                            encoding="utf-8")
            os.replace(temp, self.path)


def read_results(path: str | os.PathLike) -> list[dict]:
    return list(ResultStore(Path(path)).records.values())


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    item: Item
    attempts: int = 0  # tries started so far
    not_before: float = 0.0
    started: float = 0.0
    running_since: float = 0.0  # when the server said it started executing (0: still queued there)
    server: str = ""
    prompt_id: str = ""


@dataclass
class BatchSettings:
    servers: list[str] = field(default_factory=lambda: [DEFAULT_SERVER])
    in_flight: int = 2
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    server_timeout: float = 120.0  # how long to wait for a server that went away
    poll: float = 1.0  # /history poll interval for in-flight prompts
    retry_failed: bool = False
    http_timeout: float = 30.0
    item_timeout: float = 0.0  # seconds one prompt may run on the server; 0: no limit


class Scheduler:
    """The shared work list: ready jobs, backoff for retries, and a count of jobs being served."""

    def __init__(self, jobs: list[Job], settings: BatchSettings, finish: Callable[..., None]):
        self.pending = list(jobs)
        self.active = 0
        self.settings = settings
        self._finish = finish
        self._cv = threading.Condition()

    def take(self) -> Job | None:
        with self._cv:
            now = time.monotonic()
            for i, job in enumerate(self.pending):
                if job.not_before <= now:
                    self.active += 1
                    job.attempts += 1
                    return self.pending.pop(i)
            return None

    def retry(self, job: Job, reason: str) -> None:
        """A transient failure: back off and queue again, or give up after ``retries`` attempts."""
        if job.attempts > self.settings.retries:
            self.done(job, GAVE_UP, f"gave up after {job.attempts} attempts: {reason}")
            return
        delay = min(self.settings.backoff * 2 ** (job.attempts - 1), self.settings.max_backoff)
        job.not_before = time.monotonic() + delay
        with self._cv:
            self.pending.append(job)
            self.active -= 1
            self._cv.notify_all()

    def done(self, job: Job, status: str, error: str = "", **outputs) -> None:
        self._finish(job, status, error, **outputs)
        with self._cv:
            self.active -= 1
            self._cv.notify_all()

    def finished(self) -> bool:
        with self._cv:
            return not self.pending and self.active == 0

    def drain(self) -> list[Job]:
        with self._cv:
            jobs, self.pending = self.pending, []
            return jobs


class Display:
    """An overall bar (tqdm on a terminal, one line per finished item otherwise) plus the current item."""

    def __init__(self, total: int, skipped: int, quiet: bool = False, stream=None):
        self.total, self.finished, self.failed = total, 0, 0
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        self._lock = threading.Lock()
        if not quiet:
            print(f"batch: {total} to run, {skipped} already done", file=self.stream, flush=True)
            if self.stream.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="batch", unit="item", file=self.stream)

    def current(self, text: str) -> None:
        if self.bar is not None:
            with self._lock:
                self.bar.set_postfix_str(text, refresh=True)

    def item_done(self, record: dict) -> None:
        with self._lock:
            self.finished += 1
            self.failed += record["status"] != DONE
            if self.quiet:
                return
            if self.bar is not None:
                self.bar.update(1)
                return
            tail = f" {record['error']}" if record["error"] else f" {record['caption']!r}"[:90]
            print(f"[{self.finished}/{self.total}] {record['status']:7s} {record['id']} "
                  f"{record['seconds']:.1f}s {record['server']}{tail}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BatchRunner:
    """Runs jobs on one or more servers, one thread per server, each with up to ``in_flight`` prompts."""

    def __init__(self, items: list[Item], template: WorkflowTemplate, out: Path, settings: BatchSettings,
                 *, quiet: bool = False, stream=None):
        self.items = items
        self.template = template
        self.out = Path(out)
        self.settings = settings
        self.store = ResultStore(self.out / RESULTS_NAME)
        todo = [Job(item) for item in items if not self.store.is_done(item.id, settings.retry_failed)]
        self.scheduler = Scheduler(todo, settings, self._record)
        self.workers = [_ServerWorker(self, ComfyClient(url, settings.http_timeout)) for url in settings.servers]
        self._adopt_submitted()
        self.display = Display(len(todo), len(items) - len(todo), quiet, stream)
        self._graph_titles = {nid: title(n) or n["class_type"] for nid, n in template.graph.items()}
        self.worker_errors: list[str] = []
        self.stopping = threading.Event()

    def _adopt_submitted(self) -> None:
        """Items a killed run left queued on one of this run's servers become in-flight prompts of that server's
        worker, which checks ``/history`` and ``/queue`` when it connects: collected if finished, waited for if
        still queued, submitted again if the server does not know them."""
        by_url = {worker.client.url: worker for worker in self.workers}
        for job in list(self.scheduler.pending):
            record = self.store.records.get(job.item.id, {})
            worker = by_url.get(str(record.get("server", "")).rstrip("/"))
            if record.get("status") != SUBMITTED or worker is None or not record.get("prompt_id"):
                continue
            self.scheduler.pending.remove(job)
            self.scheduler.active += 1  # being served, like a job taken and submitted
            job.server, job.prompt_id = worker.client.url, str(record["prompt_id"])
            job.attempts, job.started = int(record.get("attempts") or 1), time.monotonic()
            worker.inflight[job.prompt_id] = job

    # -- results --------------------------------------------------------------------------------
    def _record(self, job: Job, status: str, error: str, caption: str = "", think: str = "",
                videos: list[str] | None = None) -> None:
        item = job.item
        record = {"id": item.id, "question": item.question, "input_video": item.video, "caption": caption,
                  "think": think, "video": (videos or [""])[0], "videos": videos or [],
                  "seconds": round(time.monotonic() - job.started, 3) if job.started else 0.0,
                  "status": status, "error": error, "server": job.server, "prompt_id": job.prompt_id,
                  "attempts": job.attempts, "vlm": self.template.vlm_settings}
        for key in ("ground_truth", "gt_video", "split"):
            if getattr(item, key) is not None:
                record[key] = getattr(item, key)
        self.store.add(record)
        self.display.item_done(record)

    def _record_submitted(self, job: Job) -> None:
        """Note a queued prompt at once, so that a client killed before it finishes does not queue it again."""
        item = job.item
        self.store.add({"id": item.id, "question": item.question, "input_video": item.video, "status": SUBMITTED,
                        "error": "", "server": job.server, "prompt_id": job.prompt_id, "attempts": job.attempts})

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        threads = [threading.Thread(target=self._serve, args=(worker,), daemon=True,
                                    name=f"vans-batch {worker.client.url}") for worker in self.workers]
        for t in threads:
            t.start()
        try:
            self._join(threads)
        except KeyboardInterrupt:
            self._stop(threads)
            raise
        reason = "; ".join(self.worker_errors) or "no server reachable; start one and run again to resume"
        for job in self.scheduler.drain():  # every server went away with work left
            self._record(job, GAVE_UP, reason)
        self.display.close()
        self.store.compact(item.id for item in self.items)
        counts: dict[str, int] = {}
        for item in self.items:
            status = self.store.records.get(item.id, {}).get("status", "missing")
            counts[status] = counts.get(status, 0) + 1
        return counts

    def _join(self, threads: list[threading.Thread]) -> None:
        for t in threads:
            t.join()

    def _stop(self, threads: list[threading.Thread]) -> None:
        """Ctrl-C: the workers withdraw their in-flight prompts from the servers and stop; the results file
        is compacted (withdrawn items keep their ``submitted`` record: the next run resolves them)."""
        self.stopping.set()
        if not self.display.quiet:
            print("batch: stopping: withdrawing the queued prompts; run again to resume", file=sys.stderr)
        deadline = time.monotonic() + self.settings.http_timeout + 1
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.display.close()
        self.store.compact(item.id for item in self.items)

    def _serve(self, worker: "_ServerWorker") -> None:
        client = worker.client
        try:
            worker.loop()
        except Exception as exc:  # noqa: BLE001 - a bug must not lose items: hand them back, say why
            self.worker_errors.append(f"worker for {client.url} stopped: {type(exc).__name__}: {exc}")
            print(f"error: {self.worker_errors[-1]}", file=sys.stderr)
            for job in list(worker.inflight.values()):
                self.scheduler.retry(job, self.worker_errors[-1])


class _ServerWorker:
    """Everything one server does: connect (and wait when it is down), submit, follow, collect."""

    def __init__(self, runner: BatchRunner, client: ComfyClient):
        self.runner, self.client = runner, client
        self.settings, self.scheduler = runner.settings, runner.scheduler
        self.client_id = uuid.uuid4().hex
        self.inflight: dict[str, Job] = {}
        self.ws: WebSocket | None = None
        self.uploaded: dict[str, str] = {}  # local video path -> server name
        self.down_since: float | None = None
        self.down_attempts = 0
        self.last_poll = 0.0

    def loop(self) -> None:
        stopping = self.runner.stopping
        try:
            while not self.scheduler.finished() and not stopping.is_set():
                if self.ws is None and not self._connect():
                    if self._down_too_long():
                        return
                    continue
                self._fill()
                if self.ws is not None:
                    self._wait()
        finally:
            self._disconnect()
            if stopping.is_set():  # Ctrl-C: take our prompts off the server
                for prompt_id in list(self.inflight):
                    self.client.withdraw(prompt_id)

    # -- connection -----------------------------------------------------------------------------
    def _connect(self) -> bool:
        try:
            self.ws = self.client.websocket(self.client_id)
            self._reconcile()
        except ServerUnavailable:
            self._disconnect()
            self.down_since = self.down_since or time.monotonic()
            delay = min(self.settings.backoff * 2 ** self.down_attempts, self.settings.max_backoff)
            self.down_attempts += 1
            time.sleep(min(delay, max(0.05, self.settings.server_timeout / 4)))
            return False
        self.down_since, self.down_attempts = None, 0
        return True

    def _down_too_long(self) -> bool:
        if self.down_since is None or time.monotonic() - self.down_since < self.settings.server_timeout:
            return False
        for job in list(self.inflight.values()):  # another server may take them
            self.scheduler.retry(job, f"server {self.client.url} went away")
        self.inflight.clear()
        return True

    def _disconnect(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.ws = None

    def _lost_connection(self) -> None:
        self._disconnect()
        self.uploaded.clear()  # a restarted server may have a fresh input folder

    def _reconcile(self) -> None:
        """After (re)connecting: collect prompts that finished meanwhile, requeue the ones the server lost."""
        if not self.inflight:
            return
        queued = self.client.queued_ids()
        for prompt_id, job in list(self.inflight.items()):
            history = self.client.history(prompt_id)
            if history is not None:
                self._collect(prompt_id, history)
            elif prompt_id not in queued:
                del self.inflight[prompt_id]
                self.scheduler.retry(job, f"server {self.client.url} lost prompt {prompt_id} (restarted?)")

    # -- submitting -----------------------------------------------------------------------------
    def _fill(self) -> None:
        while len(self.inflight) < self.settings.in_flight and not self.runner.stopping.is_set():
            job = self.scheduler.take()
            if job is None:
                return
            job.server, job.started = self.client.url, time.monotonic()
            try:
                job.prompt_id = self._submit(job)
            except (PromptRejected, InputError) as exc:
                self.scheduler.done(job, FAILED, str(exc))
                continue
            except ServerUnavailable as exc:
                self.scheduler.retry(job, str(exc))
                self._lost_connection()
                return
            except Exception as exc:  # noqa: BLE001 - a malformed reply (not JSON, a key missing): retry, never lose
                self.scheduler.retry(job, f"{self.client.url} answered unexpectedly: {_describe(exc)}")
                continue
            self.inflight[job.prompt_id] = job
            self.runner._record_submitted(job)

    def _submit(self, job: Job) -> str:
        video = Path(job.item.video)
        if not video.is_file():
            raise InputError(f"video {video} does not exist; fix the manifest row of {job.item.id}")
        name = self.uploaded.get(str(video))
        if name is None:
            try:
                digest = hashlib.sha1(video.read_bytes()).hexdigest()[:16]
            except OSError as exc:
                raise InputError(f"video {video} cannot be read ({exc.strerror or exc}); fix the file or the "
                                 f"manifest row of {job.item.id}") from None
            name = self.client.upload(video, f"vans_batch_{digest}{video.suffix or '.mp4'}")
            self.uploaded[str(video)] = name
        return self.client.queue_prompt(self.runner.template.fill(job.item, name), self.client_id)

    # -- following ------------------------------------------------------------------------------
    def _wait(self) -> None:
        if not self.inflight:
            if not self.scheduler.finished():
                time.sleep(0.05)  # other servers are busy or a retry is backing off
            return
        try:
            message = self.ws.recv(timeout=min(0.5, self.settings.poll))
        except ConnectionError:
            self._lost_connection()
            return
        ended = self._on_message(message) if message else None
        now = time.monotonic()
        self._expire(now)
        if ended is None and now - self.last_poll < self.settings.poll:
            return
        self.last_poll = now
        try:
            for prompt_id in ([ended] if ended else list(self.inflight)):
                history = self.client.history(prompt_id)
                if history is not None:
                    self._collect(prompt_id, history)
                elif ended:  # the end event came before the history entry: poll it shortly
                    self.last_poll = 0.0
        except ServerUnavailable:
            self._lost_connection()

    def _expire(self, now: float) -> None:
        """Fail (and withdraw) prompts that have run longer than ``item_timeout`` on the server. A prompt
        whose start was never seen counts from its submission, with the queue ahead of it allowed for."""
        limit = self.settings.item_timeout
        if limit <= 0:
            return
        for prompt_id, job in list(self.inflight.items()):
            running = now - job.running_since if job.running_since else (now - job.started) / self.settings.in_flight
            if running > limit:
                del self.inflight[prompt_id]
                self.client.withdraw(prompt_id)
                self.scheduler.done(job, FAILED, f"timed out: still running after {limit:g} s on {self.client.url} "
                                                 "(--item-timeout); the prompt was interrupted")

    def _on_message(self, message: str) -> str | None:
        """Update the display; return the prompt id when this message ends one of ours."""
        try:
            event = json.loads(message)
        except json.JSONDecodeError:
            return None
        kind, data = event.get("type"), event.get("data") or {}
        job = self.inflight.get(data.get("prompt_id", ""))
        if job is None:
            return None
        if kind in ("execution_start", "executing", "progress") and not job.running_since:
            job.running_since = time.monotonic()
        if kind == "progress":
            node = self.runner._graph_titles.get(str(data.get("node")), data.get("node"))
            self.runner.display.current(f"{job.item.id}: {node} {data.get('value')}/{data.get('max')}")
        elif kind == "executing" and data.get("node") is not None:
            self.runner.display.current(f"{job.item.id}: {self.runner._graph_titles.get(str(data['node']), data['node'])}")
        elif kind in ("execution_success", "execution_error", "execution_interrupted") or (
                kind == "executing" and data.get("node") is None):
            return data["prompt_id"]
        return None

    # -- collecting -----------------------------------------------------------------------------
    def _collect(self, prompt_id: str, history: dict) -> None:
        job = self.inflight.pop(prompt_id, None)
        if job is None:  # already settled, e.g. just failed by the --item-timeout check
            return
        status = history.get("status", {})
        if status.get("status_str") != "success":
            kind, message = execution_message(history)
            if kind == "interrupted":
                self.scheduler.retry(job, message)
            else:
                self.scheduler.done(job, FAILED, message)
            return
        try:
            caption, think, videos = self._download(job, history.get("outputs", {}))
        except ServerUnavailable as exc:
            self.scheduler.retry(job, f"download failed: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a malformed history entry or a local write error: retry
            self.scheduler.retry(job, f"download failed: {_describe(exc)}")
            return
        self.scheduler.done(job, DONE, "", caption=caption, think=think, videos=videos)

    def _download(self, job: Job, outputs: dict) -> tuple[str, str, list[str]]:
        graph = self.runner.template.graph
        caption_ui = outputs.get(self.runner.template.question_node, {})
        caption = (caption_ui.get("text") or [""])[0]
        think = (caption_ui.get("think") or [""])[0] if isinstance(caption_ui.get("think"), list) else ""
        entries = [entry for nid in sorted(outputs, key=_node_order) if nid in graph
                   for key in OUTPUT_KEYS for entry in outputs[nid].get(key, []) or []
                   if isinstance(entry, dict) and entry.get("filename") and entry.get("type", "output") == "output"]
        folder = self.runner.out / VIDEO_DIR
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        base = safe_name(job.item.id)
        for k, entry in enumerate(entries):
            suffix = Path(entry["filename"]).suffix or ".mp4"
            target = folder / (f"{base}{suffix}" if len(entries) == 1 else f"{base}_{k}{suffix}")
            temp = target.with_name(target.name + ".part")
            temp.write_bytes(self.client.view(entry))
            os.replace(temp, target)
            names.append(f"{VIDEO_DIR}/{target.name}")
        return caption, think, names


def _node_order(node_id: str):
    return (0, int(node_id)) if str(node_id).isdigit() else (1, str(node_id))


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
