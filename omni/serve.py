"""``omni serve``: an OpenAI-compatible HTTP server over a :class:`~omni.pipeline.Pipeline`, on
FastAPI + uvicorn (``pip install 'omni[serve]'``).

Endpoints: ``POST /v1/chat/completions`` (text, ``image_url``, ``input_audio``, video as
``video_url`` / ``file`` parts or a list of frames; ``stream: true`` as server-sent events),
``POST /v1/audio/transcriptions`` (Whisper's API: multipart ``file``, ``language``,
``response_format`` json | text | srt | vtt | verbose_json), ``POST /v1/audio/speech`` (text in, a
wav out, for checkpoints that write audio), ``GET /v1/models`` and ``GET /health``.

Chat requests are decoded by one :class:`Engine` per process: a thread that runs a
:class:`~omni.generation.ContinuousBatch`. Requests that arrive while nothing is decoding are
collected while they keep coming less than ``batch_window_ms`` apart (at most ten windows) and
prefilled together; requests that arrive during a decode join it at the next step (continuous
batching); each row has its own sampling settings, stop strings and token limit, and a client that
goes away frees its row at the next step. A bad request is a 400
with OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``); the server keeps serving.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request, UploadFile)
# at run time, and they are imported inside create_app (FastAPI is an optional dependency)
import asyncio
import base64
import binascii
import collections
import io
import json
import logging
import queue
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.generation import ContinuousBatch, RowSettings, left_pad
from omni.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES, Audio, Image, Video
from omni.media.audio import load_audio
from omni.pipeline import Pipeline, TextStream, _stop_strings
from omni.schema import positive
from omni.transcribe import format_segments

log = logging.getLogger(__name__)

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@dataclass
class ServeLimits:
    """What one request may ask for; a request over a limit gets a 400 (a body over
    ``max_body_mb``, a 413) naming the limit and the flag that raises it."""

    max_body_mb: float = 32.0  # --max-body-mb: the request body, base64 media included
    max_image_pixels: int = 16_000_000  # --max-image-pixels: per image or video frame
    max_audio_seconds: float = 600.0  # --max-audio-seconds: per audio part or transcription file
    max_tokens: int = 1024  # --max-tokens: the most new tokens a completion may ask for (and the default)
    max_speech_seconds: float = 30.0  # the longest clip /v1/audio/speech writes
    allow_local_files: bool = False  # --allow-local-files: image/video URLs may name server paths
    batch_window_ms: float = 5.0  # an idle engine collects requests that come less than this apart
    model_name: str = "omni"  # the id /v1/models lists

    def __post_init__(self):
        for key in ("max_body_mb", "max_image_pixels", "max_audio_seconds", "max_tokens",
                    "max_speech_seconds"):
            positive(key, getattr(self, key))
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")


class RequestError(ValueError):
    """A bad request: answered with ``status`` and OpenAI's error JSON."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ---------------------------------------------------------------------------------------------
# The engine: one decoding thread per process


class Job:
    """One chat completion in the engine; its events go to an asyncio queue on the server's loop:
    ``("start", prompt_tokens)``, ``("text", piece)``, ``("end", finish_reason, completion_tokens)``
    or ``("error", exception)``."""

    def __init__(self, sample, settings: RowSettings, stop: tuple[str, ...], loop):
        self.sample, self.settings, self.stop = sample, settings, stop
        self.loop = loop
        self._events: collections.deque = collections.deque()  # touched on the loop's thread only
        self._ready = asyncio.Event()
        self.cancelled = False
        self.text: TextStream | None = None
        self.key: int | None = None
        self.num_tokens = 0
        self.submitted = 0.0  # time.monotonic() when the engine got it

    def post(self, *event) -> None:
        """From the engine's thread: hand ``event`` to the loop."""
        try:
            self.loop.call_soon_threadsafe(self._push, event)
        except RuntimeError:  # the loop is closed: the server is going down
            pass

    def _push(self, event) -> None:
        self._events.append(event)
        self._ready.set()

    async def next(self):
        """The next event; text pieces already waiting come joined as one (a client that reads
        slower than the engine decodes gets fewer, longer chunks)."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        event = self._events.popleft()
        while event[0] == "text" and self._events and self._events[0][0] == "text":
            event = ("text", event[1] + self._events.popleft()[1])
        return event

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step."""
        self.cancelled = True


def _deliver(events: list) -> None:
    for job, event in events:
        job._push(event)


class Engine:
    """The decoding thread: :class:`~omni.generation.ContinuousBatch` over the pipeline's model."""

    MAX_WINDOWS = 10  # an idle engine collects a burst of requests for at most this many batch windows

    def __init__(self, pipeline: Pipeline, batch_window_ms: float = 5.0):
        self.pipeline, self.window = pipeline, batch_window_ms / 1000
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._deferred = False  # the last step left its forward for after the prompts that arrived
        self.batch = self._new_batch()
        self.stats = {"admitted": 0, "finished": 0, "cancelled": 0,  # requests, since the start
                      "prefills": 0,  # batched prefills they were admitted in
                      "queued_s": 0.0,  # summed over admitted requests: from submit to their prefill
                      "prefill_s": 0.0}  # summed over prefills: their time (prompts' forward, caching)

    def _new_batch(self) -> ContinuousBatch:
        proc = self.pipeline.processor
        return ContinuousBatch(self.pipeline.model, allowed=proc.vocab.span("text"),
                               **proc.generation_defaults())

    def start(self) -> None:
        self._closed.clear()
        self._thread = threading.Thread(target=self._run, name="omni-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: "Job") -> "Job":
        job.submitted = time.monotonic()
        self.inbox.put(job)
        return job

    def _take(self) -> list[Job]:
        """New jobs: all waiting ones. When nothing decodes, wait for one, then for more while they
        keep coming less than ``window`` apart, for at most ``MAX_WINDOWS`` windows in all: a burst of
        requests (clients whose answers all ended at one step) is prefilled together, and while the
        engine waits the cores are free for the server to read the rest of the burst."""
        new = []
        if not len(self.batch):
            try:
                new.append(self.inbox.get(timeout=0.2))
            except queue.Empty:
                return []
            end = time.monotonic() + self.MAX_WINDOWS * self.window
            while (left := min(self.window, end - time.monotonic())) > 0:
                try:
                    new.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                new.append(self.inbox.get_nowait())
            except queue.Empty:
                return new

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closed.is_set():
            new = [j for j in self._take() if not j.cancelled]
            for key, job in list(self.jobs.items()):
                if job.cancelled:
                    self.batch.cancel(key)
                    del self.jobs[key]
                    self.stats["cancelled"] += 1
            try:
                if new:
                    self._admit(new)
                if len(self.batch):
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not take the server down: fail these jobs
                log.exception("the decoding engine failed; its requests get an error")
                for job in [*self.jobs.values(), *(j for j in new if j.key is None)]:
                    job.post("error", e)
                self.jobs.clear()
                self.batch = self._new_batch()

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill new jobs together; when that fails, one by one, so a bad one fails alone."""
        try:
            self._prefill(jobs)
        except ValueError as e:
            if len(jobs) == 1:
                jobs[0].post("error", e)
                return
            for job in jobs:
                try:
                    self._prefill([job])
                except ValueError as e:
                    job.post("error", e)

    def _prefill(self, jobs: list[Job]) -> None:
        proc = self.pipeline.processor
        start = time.monotonic()
        rendered, inputs = proc.batch([j.sample for j in jobs])
        ids = left_pad([r.ids for r in rendered], proc.vocab.pad_id)[0]
        keys = self.batch.add(ids, [j.settings for j in jobs], **inputs)
        self.stats["prefills"] += 1
        self.stats["prefill_s"] += time.monotonic() - start
        self.stats["queued_s"] += sum(start - j.submitted for j in jobs)
        for job, r, key in zip(jobs, rendered, keys):
            job.key, job.text = key, TextStream(proc, r.ids.tolist(), job.stop)
            self.jobs[key] = job
            self.stats["admitted"] += 1
            job.post("start", len(r.ids))

    def _step(self) -> None:
        events = []  # (job, event): handed to the server's loop together, one wake-up a step
        for key, token, done in self.batch.sample():
            job = self.jobs.get(key)
            if job is None:
                continue
            if token is not None:
                job.num_tokens += 1
                piece = job.text.push(token)
            else:
                piece = ""
            stopped = token is None or job.text.finished
            if done or stopped:
                piece += job.text.flush()
            if piece:
                events.append((job, ("text", piece)))
            if done or stopped:
                if not done:
                    self.batch.cancel(key)
                events.append((job, ("end", "stop" if stopped else "length", job.num_tokens)))
                del self.jobs[key]
                self.stats["finished"] += 1
        by_loop: dict = {}
        for job, event in events:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: the server is going down
                pass
        # The forward that feeds the ids back, after they went out. Prompts that arrived meanwhile
        # go first (once in a row, so that decoding keeps moving): they are prefilled and their
        # first ids sampled and sent, then one forward serves every row.
        if self.inbox.empty() or self._deferred:
            self.batch.advance()
            self._deferred = False
        else:
            self._deferred = True


# ---------------------------------------------------------------------------------------------
# Requests -> prompt pieces


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None


def _data_url(url: str, what: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<data>`` -> (mime, bytes)."""
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError(f"{what}: expected a data URL (data:<type>;base64,<data>)")
    return head[5:].removesuffix(";base64"), _b64(data, what)


class _Media:
    """Turns a message's content parts into prompt pieces (text, Image, Audio, Video); media files
    sent as bytes are written to a temporary folder that lives as long as this object."""

    def __init__(self, pipeline: Pipeline, limits: ServeLimits):
        self.proc, self.limits = pipeline.processor, limits
        self.tmp = tempfile.TemporaryDirectory(prefix="omni-serve-")

    def close(self) -> None:
        self.tmp.cleanup()

    def _file(self, data: bytes, suffix: str) -> Path:
        path = Path(self.tmp.name) / f"{uuid.uuid4().hex}{suffix}"
        path.write_bytes(data)
        return path

    def _local(self, url: str, what: str) -> Path:
        if not self.limits.allow_local_files:
            raise RequestError(f"{what}: local paths are refused; start the server with --allow-local-files")
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise RequestError(f"{what}: {path} is not a file")
        return path

    def _url(self, url, what: str) -> tuple[str, bytes] | Path:
        """A data URL -> (mime, bytes); a local path (if allowed) -> Path."""
        if not isinstance(url, str) or not url:
            raise RequestError(f"{what}: expected a URL string")
        if url.startswith("data:"):
            return _data_url(url, what)
        if url.startswith(("http://", "https://")):
            raise RequestError(f"{what}: the server fetches no URLs; send the data as a data: URL")
        return self._local(url, what)

    def image(self, url, what: str, data: bytes | None = None) -> Image:
        if data is None:
            src = self._url(url, what)
            data = src[1] if isinstance(src, tuple) else src
        image = Image(data, max_pixels=self.limits.max_image_pixels, name=what)
        image.pixels  # noqa: B018 - decode now: a bad image is this request's 400
        return image

    def audio(self, data: bytes, suffix: str, what: str) -> Audio:
        try:  # the file is a temporary copy: the error names the request's part
            wave, rate = load_audio(self._file(data, suffix), max_seconds=self.limits.max_audio_seconds)
        except ValueError as e:
            raise RequestError(f"{what}: {e}") from None
        return Audio(wave, sample_rate=rate)

    def video(self, src: tuple[str, bytes] | Path, suffix: str) -> Video:
        path = src if isinstance(src, Path) else self._file(src[1], suffix)
        video = self.proc.media_for(path)
        if not isinstance(video, Video):
            raise RequestError(f"{path.name}: not a video")
        video.frames  # noqa: B018 - decode now, while the file exists
        return video

    def frames(self, urls, what: str) -> Video:
        if not isinstance(urls, list) or not urls:
            raise RequestError(f"{what}: expected a non-empty list of image URLs (the frames)")
        encoder = self.proc.encoders["video"] if "video" in self.proc.encoders else None
        want = getattr(encoder.video, "num_frames", None) if encoder is not None else None
        if want and len(urls) > want:  # sample the frames the way the model reads videos: evenly
            urls = [urls[round(i * (len(urls) - 1) / max(want - 1, 1))] for i in range(want)]
        pixels = [self.image(u, f"{what}[{i}]").pixels for i, u in enumerate(urls)]
        if len({p.shape for p in pixels}) > 1:
            raise RequestError(f"{what}: the frames differ in size; send frames of one size")
        return Video.from_frames(torch.stack(pixels), name=what)

    def part(self, part, what: str):
        """One content part -> a prompt piece."""
        if not isinstance(part, dict) or "type" not in part:
            raise RequestError(f"{what}: a content part is an object with a 'type'")
        kind = part["type"]
        body = part.get(kind)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{what}: a text part needs 'text'")
            return part["text"]
        if kind == "image_url":
            url = body.get("url") if isinstance(body, dict) else body
            return self.image(url, f"{what}.image_url")
        if kind == "input_audio":
            if not isinstance(body, dict) or "data" not in body:
                raise RequestError(f"{what}: input_audio needs 'data' (base64) and 'format' (wav or mp3)")
            fmt = body.get("format", "wav")
            if fmt not in ("wav", "mp3"):
                raise RequestError(f"{what}: input_audio format must be wav or mp3, got {fmt!r}")
            return self.audio(_b64(body["data"], f"{what}.input_audio.data"), "." + fmt, what)
        if kind == "video_url":
            url = body.get("url") if isinstance(body, dict) else body
            src = self._url(url, f"{what}.video_url")
            return self.video(src, _suffix(src[0] if isinstance(src, tuple) else "", VIDEO_SUFFIXES))
        if kind == "video":  # a list of frames, as image URLs
            return self.frames(body, f"{what}.video")
        if kind == "file":  # OpenAI's file part: {"file_data": base64 or a data URL, "filename"}
            if not isinstance(body, dict) or "file_data" not in body:
                raise RequestError(f"{what}: a file part needs 'file_data' (and 'filename' for its type)")
            data, name = body["file_data"], body.get("filename") or ""
            mime, raw = _data_url(data, what) if data.startswith("data:") else ("", _b64(data, what))
            suffix = Path(name).suffix.lower() or _suffix(mime, VIDEO_SUFFIXES + AUDIO_SUFFIXES
                                                          + IMAGE_SUFFIXES)
            if suffix in VIDEO_SUFFIXES:
                return self.video(("", raw), suffix)
            if suffix in AUDIO_SUFFIXES:
                return self.audio(raw, suffix, what)
            if suffix in IMAGE_SUFFIXES:
                return self.image(None, what, raw)
            raise RequestError(f"{what}: cannot tell the file's type from filename {name!r} / type {mime!r}")
        raise RequestError(f"{what}: unsupported content part type {kind!r}; supported: text, image_url, "
                           "input_audio, video_url, video (frames), file")

    def messages(self, messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        out = []
        for n, m in enumerate(messages):
            what = f"messages[{n}]"
            if not isinstance(m, dict) or "role" not in m:
                raise RequestError(f"{what}: a message is an object with 'role' and 'content'", "messages")
            role = {"developer": "system"}.get(m["role"], m["role"])
            if role not in ("system", "user", "assistant"):
                raise RequestError(f"{what}: role must be system, developer, user or assistant, got {role!r}",
                                   "messages")
            content = m.get("content")
            if isinstance(content, list):
                content = [self.part(p, f"{what}.content[{i}]") for i, p in enumerate(content)]
            elif not isinstance(content, str):
                raise RequestError(f"{what}: content must be a string or a list of parts", "messages")
            out.append({"role": role, "content": content})
        return out


def _suffix(mime: str, allowed: tuple[str, ...]) -> str:
    """A file suffix for a MIME type such as ``video/mp4`` or ``audio/mpeg`` (the first of ``allowed``
    when the type says nothing: the decoders read the bytes, not the name)."""
    sub = mime.partition("/")[2].lower()
    sub = {"mpeg": "mp3", "x-wav": "wav", "wave": "wav", "quicktime": "mov", "jpeg": "jpg"}.get(sub, sub)
    return f".{sub}" if f".{sub}" in allowed else allowed[0]


CHAT_KEYS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "stop", "seed", "n", "user", "frequency_penalty", "presence_penalty",
             "logprobs", "top_logprobs", "response_format", "metadata", "store"}


def _number(body: dict, key: str, kind, default, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        what = "a number" if kind is float else "an integer"
        raise RequestError(f"'{key}' must be {what}, got {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"'{key}' must be in [{lo}, {hi}], got {value}", key)
    return kind(value)


def chat_settings(body: dict, limits: ServeLimits) -> tuple[RowSettings, tuple[str, ...]]:
    """A chat request's decoding settings and stop strings (everything but the messages)."""
    unknown = sorted(set(body) - CHAT_KEYS)
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    if _number(body, "n", int, 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, float, 0.0) != 0:
            raise RequestError(f"'{key}' is not supported (only 0)", key)
    if body.get("logprobs"):
        raise RequestError("logprobs are not supported", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("only response_format {'type': 'text'} is supported", "response_format")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, limits.max_tokens, lo=1)
    if max_tokens > limits.max_tokens:
        raise RequestError(f"'{key}' is {max_tokens}, over this server's limit of {limits.max_tokens} "
                           "(--max-tokens)", key)
    try:
        stop = _stop_strings(body.get("stop"))
    except ValueError as e:
        raise RequestError(str(e), "stop") from None
    if len(stop) > 4:
        raise RequestError("at most 4 stop strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    temperature = _number(body, "temperature", float, 1.0, 0, 2)
    top_p = _number(body, "top_p", float, 1.0, 0, 1)
    if top_p == 0:  # nothing but the likeliest token: greedy
        temperature, top_p = 0.0, 1.0
    return RowSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed), stop


# ---------------------------------------------------------------------------------------------
# The app


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (by its Content-Length, or as it streams
    in) is answered 413 before the app reads it whole."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0
        started = False

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self.TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except self.TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"the request body is over this server's limit of "
                                     f"{self.max_bytes / 2**20:g} MB (--max-body-mb)")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(pipeline: Pipeline, limits: ServeLimits | None = None):
    """The FastAPI app serving ``pipeline``; its engine thread runs while the app does (lifespan)."""
    try:
        from fastapi import FastAPI, File, Form, Request, UploadFile
        from fastapi.concurrency import run_in_threadpool
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise ImportError(f"omni serve needs FastAPI and uvicorn: pip install 'omni[serve]' ({e})") from None

    limits = limits or ServeLimits()
    pipeline.eval()
    proc = pipeline.processor
    engine = Engine(pipeline, limits.batch_window_ms)
    aux_lock = threading.Lock()  # transcription and speech: one at a time, beside the chat engine

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="omni", lifespan=lifespan)
    app.state.engine, app.state.limits = engine, limits  # read at each request
    app.add_middleware(_BodyLimit, max_bytes=int(limits.max_body_mb * 2**20))

    @app.exception_handler(RequestError)
    async def _bad_request(request, exc: RequestError):
        return JSONResponse(error_body(str(exc), param=exc.param), status_code=exc.status)

    @app.exception_handler(ValueError)  # MediaError and the library's checks: the request's fault
    async def _value_error(request, exc: ValueError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def model_card() -> dict:
        return {"id": limits.model_name, "object": "model", "created": int(time.time()), "owned_by": "omni"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": dict(app.state.engine.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != limits.model_name:
            raise RequestError(f"the model {name!r} does not exist; this server serves {limits.model_name!r}",
                               "model", status=404)
        return model_card()

    def prepare_chat(body: dict):
        settings, stop = chat_settings(body, limits)
        media = _Media(pipeline, limits)
        try:
            sample = proc.sample(media.messages(body.get("messages")))
            proc.check_length(len(proc.render(sample, add_generation_prompt=True)), "the prompt")
        finally:
            media.close()
        return sample, settings, stop

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        sample, settings, stop = await run_in_threadpool(prepare_chat, body)
        job = engine.submit(Job(sample, settings, stop, asyncio.get_running_loop()))
        event = await job.next()
        if event[0] == "error":
            raise event[1]
        prompt_tokens = event[1]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": limits.model_name}

        def usage(n: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(delta: dict, finish=None, **extra) -> str:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                out = {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}
                return f"data: {json.dumps(out)}\n\n"

            async def events():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while True:
                        event = await job.next()
                        if event[0] == "text":
                            yield chunk({"content": event[1]})
                        elif event[0] == "end":
                            yield chunk({}, event[1])
                            if include_usage:
                                out = {**base, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(event[2])}
                                yield f"data: {json.dumps(out)}\n\n"
                            break
                        else:
                            yield f"data: {json.dumps(error_body(str(event[1]), 'server_error'))}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()  # a client that went away frees its row (a finished job is gone already)

            return StreamingResponse(events(), media_type="text/event-stream")

        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.next(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)
                    continue
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "end":
                    break
                else:
                    raise event[1]
        finally:
            job.cancel()
        message = {"role": "assistant", "content": "".join(pieces)}
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": event[1]}],
                "usage": usage(event[2])}

    def audio_file(data: bytes, filename: str, tmp: Path) -> Path:
        suffix = Path(filename or "").suffix.lower()
        if suffix not in AUDIO_SUFFIXES + VIDEO_SUFFIXES:
            raise RequestError(f"file {filename!r}: not an audio file this server reads "
                               f"({', '.join(AUDIO_SUFFIXES)})", "file")
        path = tmp / f"upload{suffix}"
        path.write_bytes(data)
        return path

    def transcribe(data: bytes, filename: str, language: str | None, fmt: str):
        with tempfile.TemporaryDirectory(prefix="omni-serve-") as tmp:
            path = audio_file(data, filename, Path(tmp))
            wave, rate = load_audio(path, max_seconds=limits.max_audio_seconds)  # the limit, before decoding
            with aux_lock:
                transcript = pipeline.transcribe(path, language=language, format=None, progress=False)
        text = format_segments(transcript, "txt").strip()
        if fmt == "json":
            return {"text": text}
        if fmt == "text":
            return PlainTextResponse(text + "\n")
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(format_segments(transcript, fmt))
        segments = [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [],
                     "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
                    for i, s in enumerate(transcript)]
        return {"task": "transcribe", "language": transcript.language, "duration": len(wave) / rate,
                "text": text, "segments": segments}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(file: UploadFile = File(...), model: str | None = Form(None),
                             language: str | None = Form(None), response_format: str = Form("json"),
                             prompt: str | None = Form(None), temperature: float | None = Form(None)):
        if response_format not in TRANSCRIPTION_FORMATS:
            raise RequestError(f"response_format must be one of {', '.join(TRANSCRIPTION_FORMATS)}, got "
                               f"{response_format!r}", "response_format")
        data = await file.read()
        return await run_in_threadpool(transcribe, data, file.filename, language or None, response_format)

    def speak(text: str) -> bytes:
        import soundfile as sf

        with aux_lock:
            audio = pipeline.generate([text], output="audio", max_seconds=limits.max_speech_seconds)
        buf = io.BytesIO()
        sf.write(buf, audio.waveform.clamp(-1, 1).numpy(), audio.sample_rate, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        body = await json_body(request)
        unknown = sorted(set(body) - {"model", "input", "voice", "response_format", "speed", "instructions"})
        if unknown:
            raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
        if "audio" not in proc.outputs():
            raise RequestError("this checkpoint writes no audio (it has no codec / audio heads)", "model")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise RequestError("'input' must be a non-empty string", "input")
        if body.get("response_format", "wav") != "wav":
            raise RequestError("response_format must be 'wav'", "response_format")
        wav = await run_in_threadpool(speak, text)
        return Response(wav, media_type="audio/wav")

    return app


SERVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          device: str = "cpu", dtype: str = "float32") -> None:
    """Load ``ckpt`` and serve it with uvicorn until interrupted (``omni serve``); ``dtype``
    bfloat16 casts the text path (:meth:`OmniModel.cast`)."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("omni serve needs FastAPI and uvicorn: pip install 'omni[serve]'") from None
    if dtype not in SERVE_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(SERVE_DTYPES)}")
    limits = limits or ServeLimits(model_name=Path(ckpt).name)
    pipeline = Pipeline.from_pretrained(ckpt, device=device)
    pipeline.model.cast(SERVE_DTYPES[dtype])
    uvicorn.run(create_app(pipeline, limits), host=host, port=port, log_level="info")
