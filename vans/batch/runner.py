"""Running a batch: ``BatchSettings``, ``Job``, the shared ``Scheduler``, the progress ``Display``,
``BatchRunner`` (one thread per server) and ``_ServerWorker`` (submit, follow and collect on one server)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .manifest import Item, safe_name
from .results import DONE, FAILED, GAVE_UP, RESULTS_NAME, SUBMITTED, VIDEO_DIR, ResultStore
from .transport import (DEFAULT_SERVER, ComfyClient, PromptRejected, ServerUnavailable, WebSocket, _describe,
                        execution_message)
from .workflow import OUTPUT_KEYS, WorkflowTemplate, title


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
