"""Transport, standard library only: ``ComfyClient`` (ComfyUI's HTTP API through urllib), the minimal RFC 6455
``WebSocket`` client, the two failures they raise, and the server's error messages on one line."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ..errors import InputError

DEFAULT_SERVER = "http://127.0.0.1:8188"


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
