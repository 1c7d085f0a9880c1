"""A real ComfyUI server for the tests: own process, free port, scratch base directory, in-memory database,
no paid API nodes, and only two custom node packs (this one and the tiny-architecture test pack),
both reached through the ``custom_nodes:`` entry of an extra_model_paths.yaml. The tiny model files
are announced through the same yaml, the VLM folder under the pack's ``LLM`` key: so the test also
shows that extra_model_paths.yaml is honoured.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK_FOLDER_NAME = "ComfyUI-VANS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_dir: Path, pack_root: Path, models, scratch: Path, extra_args: tuple[str, ...] = ()):
        self.comfyui_dir = comfyui_dir
        self.pack_root = pack_root
        self.models = models
        self.scratch = scratch
        self.base = scratch / "base"
        self.log_path = scratch / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = tuple(extra_args)  # more main.py options, e.g. ("--front-end-root", folder)
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- life cycle -------------------------------------------------------------------------------
    def _write_config(self) -> Path:
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        packs = self.scratch / "packs"
        packs.mkdir(exist_ok=True)
        for name, target in ((PACK_FOLDER_NAME, self.pack_root), ("vans_tiny_arch", HERE / "tiny_arch_pack")):
            link = packs / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        lines = ["vans_tests:", f"    custom_nodes: {packs}"]
        lines += [f"    {key}: {folder}" for key, folder in self.models.folder_map().items()]
        config = self.scratch / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return config

    def start(self, timeout: float = 180.0) -> None:
        config = self._write_config()
        env = dict(os.environ, VANS_TINY_ARCH=str(self.models.arch_file), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--extra-model-paths-config", str(config),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args]
        self._log_file = open(self.log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env=env)
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    # -- HTTP -------------------------------------------------------------------------------------
    def get(self, path: str, **kwargs):
        import requests

        response = requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, payload: dict | None = None, **kwargs):
        import requests

        return requests.post(self.url + path, json=payload, timeout=kwargs.pop("timeout", 30), **kwargs)

    def upload(self, path: Path, name: str | None = None) -> str:
        import requests

        with open(path, "rb") as f:
            response = requests.post(self.url + "/upload/image", files={"image": (name or path.name, f)},
                                     data={"type": "input", "overwrite": "true"}, timeout=30)
        response.raise_for_status()
        return response.json()["name"]

    def output_path(self, item: dict) -> Path:
        return self.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]

    # -- prompts ----------------------------------------------------------------------------------
    def client(self) -> "EventClient":
        return EventClient(self)

    def run(self, graph: dict, timeout: float = 300.0) -> "PromptRun":
        with self.client() as client:
            prompt_id = client.queue(graph)
            return client.wait(prompt_id, timeout)


class PromptRun:
    def __init__(self, prompt_id: str, events: list[tuple[str, dict]], history: dict):
        self.prompt_id = prompt_id
        self.events = events
        self.history = history

    @property
    def outcome(self) -> str:
        for event, _ in reversed(self.events):
            if event in ("execution_success", "execution_error", "execution_interrupted"):
                return event
        return "unfinished"

    def event(self, name: str) -> dict | None:
        return next((data for event, data in self.events if event == name), None)

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})


class EventClient:
    """A websocket client: a prompt's events go only to the socket whose id was sent as client_id."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.client_id = uuid.uuid4().hex
        self.events: queue.Queue = queue.Queue()
        self._thread = None
        self._ws = None

    def __enter__(self):
        import websocket

        self._ws = websocket.create_connection(f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.client_id}",
                                               timeout=600)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        try:
            self._ws.close()
        except Exception:
            pass

    def _listen(self):
        while True:
            try:
                message = self._ws.recv()
            except Exception:
                return
            if not message:  # the socket was closed
                return
            if isinstance(message, str):
                data = json.loads(message)
                self.events.put((data.get("type"), data.get("data", {}), time.monotonic()))

    def queue(self, graph: dict) -> str:
        response = self.server.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if response.status_code != 200:
            raise AssertionError(f"/prompt refused the graph: {response.status_code} {response.text[:3000]}")
        return response.json()["prompt_id"]

    def next_event(self, timeout: float):
        return self.events.get(timeout=timeout)

    def wait(self, prompt_id: str, timeout: float, on_event=None) -> PromptRun:
        """Collect this prompt's events until it ends; ``on_event(event, data, t)`` sees each as it comes."""
        collected: list[tuple[str, dict]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; events: {collected[-10:]}")
            try:
                event, data, t = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            collected.append((event, data))
            if on_event is not None:
                on_event(event, data, t)
            if event in ("execution_success", "execution_error", "execution_interrupted"):
                break
        history = {}
        for _ in range(50):  # the history entry is written right after the last event
            history = self.server.get(f"/history/{prompt_id}").get(prompt_id, {})
            if history:
                break
            time.sleep(0.1)
        return PromptRun(prompt_id, collected, history)
