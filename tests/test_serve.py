"""``omni serve``: a live uvicorn server on a free port, driven by the official ``openai`` client.

The tiny any2any checkpoint (tests/data/ckpt_v1) reads text, images, video and audio (audio through
cross-attention) and writes audio; the tiny imported Whisper transcribes. Completions are compared
with the pipeline's own output for the same prompt and seed, alone, so batching must not change them.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import omni  # noqa: E402
from omni.media import Audio, Image, Video  # noqa: E402
from omni.serve import Engine, ServeLimits, create_app  # noqa: E402

CKPT = Path(__file__).parent / "data" / "ckpt_v1"
CLIP = Path(__file__).parent / "data" / "ckpt_v1_clip.mp4"


@contextmanager
def live_server(pipeline, limits: ServeLimits):
    """The app on 127.0.0.1 and a free port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipeline, limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def v1():
    return omni.load(CKPT)


@pytest.fixture(scope="module")
def served(v1):
    limits = ServeLimits(max_body_mb=1, max_image_pixels=100_000, max_audio_seconds=5, max_speech_seconds=0.2,
                         model_name="v1")
    with live_server(v1, limits) as (url, app):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30), app


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def _png(color=(200, 30, 30), size=(40, 30)) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds=0.5, freq=440.0) -> bytes:
    t = torch.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    import soundfile as sf

    sf.write(buf, (0.3 * torch.sin(2 * torch.pi * freq * t)).numpy(), 16000, format="WAV")
    return buf.getvalue()


def _mp3(seconds=0.5, freq=440.0, rate=16000) -> bytes:
    """A tone as mp3, encoded with PyAV (skips the test when PyAV or its mp3 encoder is missing)."""
    av = pytest.importorskip("av", reason="encoding an mp3 needs PyAV (pip install av)")
    codec = next((c for c in ("libmp3lame", "mp3") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("this PyAV build has no mp3 encoder (libmp3lame)")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        t = torch.arange(int(rate * seconds)) / rate
        frame = av.AudioFrame.from_ndarray((0.3 * torch.sin(2 * torch.pi * freq * t)).numpy()[None],
                                           format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


SAMPLED = dict(temperature=1.0, seed=3, max_tokens=12)


def _alone(pipe, content, seed=3, max_tokens=12, **kwargs):
    return pipe.generate([{"role": "user", "content": content}], max_new_tokens=max_tokens, temperature=1.0,
                         seed=seed, **kwargs)


def test_chat_matches_the_pipeline_and_counts_tokens(client, v1):
    r = client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "Hello there"}],
                                       **SAMPLED)
    assert r.object == "chat.completion" and r.model == "v1"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _alone(v1, "Hello there")
    prompt = v1.processor.render(v1.processor.sample([{"role": "user", "content": "Hello there"}]),
                                 add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt.ids)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_sends_the_same_text_as_events(client, v1):
    stream = client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "Hello there"}],
                                            stream=True, stream_options={"include_usage": True},
                                            temperature=1.0, seed=3, max_completion_tokens=12)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _alone(v1, "Hello there")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_concurrent_requests_are_batched_and_each_matches_it_alone(served, v1):
    """Eight clients at once, each with its own prompt, seed and length: the engine decodes them
    in one batch (rows join and leave at their own steps), and each gets its text alone."""
    client, app = served
    prompts = [f"Tell me about {w}" for w in ("cats", "the sea", "rain", "a long day at the office",
                                               "x", "music", "trains", "the moon")]
    before = app.state.engine.stats["admitted"]

    def ask(i):
        return client.chat.completions.create(model="v1", messages=[{"role": "user", "content": prompts[i]}],
                                              temperature=1.0, seed=i, max_tokens=4 + 3 * i).choices[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert [c.message.content for c in got] == [_alone(v1, p, seed=i, max_tokens=4 + 3 * i)
                                                for i, p in enumerate(prompts)]
    assert app.state.engine.stats["admitted"] - before == 8


def test_an_idle_engine_prefills_a_burst_together(v1):
    """Requests that keep coming less than a window apart are taken together, however long the
    burst (up to ten windows); a longer gap ends it."""
    engine = Engine(v1, batch_window_ms=100)  # not started: _take is called by hand

    def feed(gaps):
        for i, gap in enumerate(gaps):
            time.sleep(gap)
            engine.inbox.put(i)

    feeder = threading.Thread(target=feed, args=([0, 0.03, 0.03, 0.03, 0.03, 0.03, 0.4, 0.03],))
    feeder.start()
    assert engine._take() == [0, 1, 2, 3, 4, 5]  # 150 ms in all: more than one window
    while not (rest := engine._take()):  # an idle engine polls its inbox every 0.2 s
        pass
    assert rest == [6, 7]
    feeder.join()


def test_input_audio_in_mp3(client, v1, tmp_path):
    """OpenAI's input_audio formats are wav and mp3: an mp3 part is read as the same file on disk is."""
    data = _mp3()
    (tmp_path / "a.mp3").write_bytes(data)
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "mp3"}}
    r = client.chat.completions.create(model="v1", messages=[{"role": "user", "content": [
        audio, {"type": "text", "text": "What is it?"}]}], **SAMPLED)
    assert r.choices[0].message.content == _alone(v1, [Audio(tmp_path / "a.mp3"), "What is it?"])
    assert Audio(tmp_path / "a.mp3").waveform.shape[-1] >= 0.45 * 16000  # decoded, about 0.5 s


def test_stop_strings_end_the_text(client, v1):
    full = _alone(v1, "Hello there", max_tokens=12)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and full[i:i + 2]
                not in full[:i])
    r = client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "Hello there"}],
                                       stop=[stop], **SAMPLED)
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_image_audio_and_video_parts(client, v1, tmp_path):
    png, wav = _png(), _wav()
    (tmp_path / "a.wav").write_bytes(wav)
    image = {"type": "image_url", "image_url": {"url": _data_url(png, "image/png")}}
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    frames = {"type": "video", "video": [_data_url(_png((i * 60, 0, 0)), "image/png") for i in range(3)]}
    clip = {"type": "file", "file": {"file_data": _data_url(CLIP.read_bytes(), "video/mp4"),
                                     "filename": "clip.mp4"}}

    def ask(parts):
        return client.chat.completions.create(model="v1", messages=[{"role": "user", "content": parts}],
                                              **SAMPLED).choices[0].message.content

    assert ask([image, {"type": "text", "text": "What is it?"}]) == _alone(v1, [Image(png), "What is it?"])
    assert ask([audio, {"type": "text", "text": "What is it?"}]) == _alone(
        v1, [Audio(tmp_path / "a.wav"), "What is it?"])
    assert ask([clip, {"type": "text", "text": "What happens?"}]) == _alone(
        v1, [v1.processor.media_for(CLIP), "What happens?"])
    first_last = torch.stack([Image(_png((i * 60, 0, 0))).pixels for i in (0, 2)])  # sampled to 2 frames
    assert ask([frames, {"type": "text", "text": "What happens?"}]) == _alone(
        v1, [Video.from_frames(first_last), "What happens?"])


def _user(part: dict) -> dict:
    return dict(messages=[{"role": "user", "content": [part]}])


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _audio_part(data: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


@pytest.mark.parametrize("body, message", [
    (dict(messages=[]), "messages"),
    (dict(max_tokens=5000), "over this server's limit of 1024"),
    (dict(n=2), "n=1"),
    (dict(bogus=1), "unrecognized request argument"),
    (dict(temperature=3), "temperature"),
    (_user(_image_part("data:image/png;base64,AAAA")), "image_url"),
    (_user(_image_part("/etc/hostname")), "--allow-local-files"),
    (_user(_image_part("https://example.com/y.png")), "fetches no URLs"),
    (_user(_image_part(_data_url(_png(size=(400, 300)), "image/png"))), "pixels"),
    (_user(_audio_part("@@")), "base64"),
    (_user(_audio_part(base64.b64encode(_wav(seconds=6)).decode())), "seconds"),
    (_user(_audio_part(base64.b64encode(b"not a sound file").decode())), "messages[0].content[0]: "),
    (_user({"type": "refusal", "refusal": "no"}), "unsupported content part type"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, message):
    request = dict(model="v1", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    request.update(body)
    extra = {k: request.pop(k) for k in list(request) if k == "bogus"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request, extra_body=extra or None)
    assert e.value.status_code == 400
    assert message in e.value.body["message"], e.value.body
    assert e.value.body["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2).choices[0].finish_reason


def test_body_limit_models_and_health(served):
    client, _ = served
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "x" * 1_200_000}])
    assert e.value.status_code == 413 and "--max-body-mb" in e.value.body["message"]
    assert [m.id for m in client.models.list()] == ["v1"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    health = client.get("/../health", cast_to=object)
    assert health["status"] == "ok" and health["engine"]["admitted"] >= health["engine"]["prefills"] >= 1
    assert health["engine"]["prefill_s"] > 0 and health["engine"]["queued_s"] >= 0


def test_a_client_that_disconnects_frees_its_row(served):
    """The checkpoint's greedy reply never ends (it repeats a special token), so only the client
    going away can end this stream early."""
    client, app = served
    engine = app.state.engine
    before = engine.stats["cancelled"]
    stream = client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "Go on"}],
                                            temperature=0, max_tokens=1024, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while engine.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats["cancelled"] == before + 1
    assert not engine.jobs


def test_speech_returns_a_wav(client, v1):
    wav = client.audio.speech.create(model="v1", input="Hello", voice="alloy", response_format="wav").read()
    assert wav[:4] == b"RIFF"
    import soundfile as sf

    data, rate = sf.read(io.BytesIO(wav))
    assert rate == v1.codec.sample_rate and len(data) / rate <= 0.2 + 1e-6


@pytest.fixture(scope="module")
def whisper_client(whisper_ckpt):
    with live_server(omni.load(whisper_ckpt), ServeLimits(model_name="whisper")) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_transcription_in_every_format(whisper_client, whisper_ckpt, tmp_path, fmt):
    path = tmp_path / "tone.wav"
    path.write_bytes(_wav(seconds=1.0))
    expected = omni.load(whisper_ckpt).transcribe(path, format=None, progress=False)
    with path.open("rb") as f:
        r = whisper_client.audio.transcriptions.create(model="whisper", file=f, response_format=fmt)
    text = " ".join(s.text for s in expected).strip()
    if fmt == "json":
        assert r.text == text
    elif fmt == "text":
        assert r.strip() == text
    elif fmt == "verbose_json":
        assert r.text == text and r.duration == pytest.approx(1.0)
        assert [(s.start, s.end, s.text) for s in r.segments] == [(s.start, s.end, s.text) for s in expected]
    else:
        from omni.transcribe import format_segments

        assert r == format_segments(expected, fmt)


def test_transcription_errors(whisper_client, client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        whisper_client.audio.transcriptions.create(model="whisper", file=("a.wav", _wav()),
                                                   response_format="xml")
    with pytest.raises(openai.BadRequestError, match="Whisper"):  # the any2any checkpoint does not transcribe
        client.audio.transcriptions.create(model="v1", file=("a.wav", _wav()))
    with pytest.raises(openai.BadRequestError, match="audio"):
        whisper_client.audio.transcriptions.create(model="whisper", file=("a.txt", b"hello"))


def test_omni_serve_flags_become_the_limits(monkeypatch):
    import omni.cli

    seen = {}
    monkeypatch.setattr(omni.cli, "serve", lambda ckpt, **kw: seen.update(ckpt=ckpt, **kw))
    argv = ["serve", "--ckpt", str(CKPT), "--port", "9001", "--allow-local-files", "--max-body-mb", "2",
            "--max-image-pixels", "1000", "--max-audio-seconds", "3", "--max-tokens", "7",
            "--dtype", "bfloat16"]
    assert omni.cli.main(argv) == 0
    limits = seen["limits"]
    assert seen["port"] == 9001 and seen["host"] == "127.0.0.1" and limits.model_name == "ckpt_v1"
    assert seen["dtype"] == "bfloat16"
    assert (limits.allow_local_files, limits.max_body_mb, limits.max_image_pixels, limits.max_audio_seconds,
            limits.max_tokens) == (True, 2, 1000, 3, 7)
    with pytest.raises(ValueError, match="max_tokens"):
        ServeLimits(max_tokens=0)


def test_bfloat16_serving_matches_its_pipeline(tmp_path):
    """``omni serve --dtype bfloat16``: the text path in bfloat16 (the audio tower and the rotary
    tables stay float32); concurrent completions, one with audio, each as the cast pipeline alone."""
    pipe = omni.load(CKPT)
    pipe.model.cast(torch.bfloat16)
    assert pipe.model.backbone.rotary.inv_freq.dtype == torch.float32
    assert pipe.model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pipe.model.encoders.parameters())
    wav = _wav()
    (tmp_path / "a.wav").write_bytes(wav)
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    prompts = ["Hello there", "Tell me about cats", [audio, {"type": "text", "text": "What is it?"}]]
    with live_server(pipe, ServeLimits(model_name="v1")) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: client.chat.completions.create(
                model="v1", messages=[{"role": "user", "content": p}], **SAMPLED).choices[0].message.content,
                prompts))
    assert got[:2] == [_alone(pipe, p) for p in prompts[:2]]
    assert got[2] == _alone(pipe, [Audio(tmp_path / "a.wav"), "What is it?"])


def test_bfloat16_on_a_cpu_that_would_emulate_it_warns(monkeypatch, caplog):
    """``omni serve --dtype bfloat16`` is the user's choice, kept; on a CPU without bfloat16 kernels
    (AVX2 alone) the cast says that it will run slower than float32."""
    from omni.model import omni_model

    pipe = omni.load(CKPT)
    for emulated in (False, True):
        monkeypatch.setattr(omni_model, "bf16_is_emulated", lambda device, e=emulated: e)
        caplog.clear()
        with caplog.at_level("WARNING", logger="omni.model.omni_model"):
            pipe.model.cast(torch.bfloat16)
        assert ("emulated" in caplog.text) == emulated
    assert pipe.model.lm_head.weight.dtype == torch.bfloat16


def test_a_prompt_that_fails_its_prefill_fails_alone(v1):
    """Prompts prefilled together where one cannot be (longer than the context): that one gets
    the error, the other is decoded."""
    import asyncio

    from omni.generation import RowSettings
    from omni.serve import Engine, Job

    too_long = v1.processor.sample("word " * 1100)
    fine = v1.processor.sample([{"role": "user", "content": "Hi"}])
    engine = Engine(v1, batch_window_ms=50)

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [engine.submit(Job(s, RowSettings(max_new_tokens=3), (), loop)) for s in (too_long, fine)]
        engine.start()
        try:
            first = [await asyncio.wait_for(j.next(), 30) for j in jobs]
            events = [first[1]]
            while events[-1][0] not in ("end", "error"):
                events.append(await asyncio.wait_for(jobs[1].next(), 30))
            return first[0], events
        finally:
            engine.stop()

    failed, events = asyncio.run(run())
    assert failed[0] == "error" and "context" in str(failed[1])
    assert events[0][0] == "start" and events[-1][:2] == ("end", "length") and events[-1][2] == 3
    assert engine.stats["admitted"] == 1


def test_local_image_paths_behind_the_flag(served, v1, tmp_path):
    client, app = served
    path = tmp_path / "red.png"
    path.write_bytes(_png())
    parts = [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": "What is it?"}]
    with pytest.raises(openai.BadRequestError, match="--allow-local-files"):
        client.chat.completions.create(model="v1", messages=[{"role": "user", "content": parts}], **SAMPLED)
    messages = [{"role": "user", "content": parts}]
    app.state.limits.allow_local_files = True
    try:
        r = client.chat.completions.create(model="v1", messages=messages, **SAMPLED)
    finally:
        app.state.limits.allow_local_files = False
    assert r.choices[0].message.content == _alone(v1, [Image(path), "What is it?"])
