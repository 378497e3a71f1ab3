"""The OpenAI-compatible server, driven by the official ``openai`` client on loopback."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn
from helpers import world_media, world_prompt
from hydra import compose, initialize_config_dir
from PIL import Image

from mmfuse.chat import chat
from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.collate import Collator
from mmfuse.serve.batcher import DynamicBatcher, Job, shared_prompts
from mmfuse.serve.cli import build_server
from mmfuse.serve.engine import EngineProcess
from mmfuse.types import Sample

KEY = "sk-test-key"
NAME = "tiny"
BODY_LIMIT = 400_000


@contextmanager
def live_server(trained_run: Path, world_dir: Path, separate_process: bool = False):
    """A live server on a free loopback port; yields (base URL, batcher). The model runs on a
    thread of this process (the tests read its batcher) unless ``separate_process``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "serve",
            overrides=[
                f"ckpt={trained_run / 'model'}",
                f"model_name={NAME}",
                f"api_key={KEY}",
                "threads=1",
                "batching.max_batch_size=8",
                "batching.max_wait_ms=50",
                f"limits.max_body_bytes={BODY_LIMIT}",
                "requests.max_tokens=64",
                "media.max_image_pixels=100000",
                "media.max_audio_seconds=2.0",
                f"media.local_dir={world_dir}",
                f"batching.separate_process={str(separate_process).lower()}",
            ],
        )
    app, batcher = build_server(cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", batcher
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        batcher.close()


@pytest.fixture(scope="module")
def server(trained_run: Path, world_dir: Path):
    """The server with its batcher on a thread of this process (the tests read the batcher)."""
    with live_server(trained_run, world_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _audio_part(path: Path) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def _content(text: str, image: Path | None = None, audio: Path | None = None) -> list[dict]:
    parts = []
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": _data_url(image)}})
    if audio is not None:
        parts.append(_audio_part(audio))
    return [*parts, {"type": "text", "text": text}]


def _chat_cli(run: Path, prompt: str, image=None, audio=None, **generation) -> str:
    """What ``mmfuse-chat ckpt=... prompt=...`` answers, for the same input and settings."""
    overrides = [f"ckpt={run / 'model'}", f"prompt={prompt}", "stream=false"]
    overrides += [f"image={image}"] if image else []
    overrides += [f"audio={audio}"] if audio else []
    overrides += [f"generation.{k}={v}" for k, v in generation.items()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("chat", overrides=overrides)
    return chat(cfg, stdout=io.StringIO())


@pytest.mark.parametrize(
    "prompt, use_image, use_audio",
    [
        ("How many beeps are there?", False, False),
        ("Describe the image.", True, False),
        ("Describe the sound.", False, True),
        ("Are there as many beeps as shapes?", True, True),
    ],
)
def test_turn_equals_chat_cli(client, trained_run, world_dir, prompt, use_image, use_audio):
    image, audio = world_media(world_dir)
    image, audio = (image if use_image else None), (audio if use_audio else None)
    response = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": _content(prompt, image, audio)}],
        temperature=0,
        max_tokens=12,
    )
    expected = _chat_cli(trained_run, prompt, image, audio, max_new_tokens=12)
    assert expected  # a real answer, not two empty strings
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 5 and 0 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_seeded_sampling_and_n_equal_chat_cli(client, server, trained_run, world_dir):
    image, _ = world_media(world_dir)
    before = len(server[1].batch_sizes)
    response = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": _content("Describe the image.", image)}],
        temperature=1.5,
        seed=11,
        n=2,
        max_tokens=10,
    )
    assert [c.index for c in response.choices] == [0, 1]
    for i, choice in enumerate(response.choices):
        expected = _chat_cli(
            trained_run,
            "Describe the image.",
            image,
            do_sample="true",
            temperature=1.5,
            seed=11 + i,
            max_new_tokens=10,
        )
        assert choice.message.content == expected
    assert response.usage.completion_tokens > 0
    assert server[1].batch_sizes[before:] == [2]  # the two choices were prefilled together


def test_streaming_gives_the_same_text(client, world_dir):
    image, audio = world_media(world_dir)
    messages = [{"role": "user", "content": _content("Describe the image.", image, audio)}]
    whole = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=16
    )
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    finals = [reason for reason in finals if reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_engine_process_serves_the_same_answers(client, trained_run, world_dir):
    """With ``batching.separate_process`` (the model in a child process,
    mmfuse/serve/engine.py) the server streams what the single-process server answers,
    sampled and seeded included."""
    image, audio = world_media(world_dir)
    messages = [{"role": "user", "content": _content("Describe the image.", image, audio)}]
    settings = {"temperature": 1.5, "seed": 4, "max_tokens": 12}
    expected = client.chat.completions.create(model=NAME, messages=messages, **settings)
    with live_server(trained_run, world_dir, separate_process=True) as (url, engine):
        assert isinstance(engine, EngineProcess)
        other = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        chunks = other.chat.completions.create(
            model=NAME, messages=messages, stream=True, n=2, **settings
        )
        texts = ["", ""]
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
    assert texts[0] == expected.choices[0].message.content
    assert texts[1] != texts[0]  # choice 1 samples with seed + 1


def test_stop_string_cuts_the_answer(client):
    messages = [{"role": "user", "content": "Describe the sound."}]
    full = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=16
    ).choices[0]
    text = full.message.content
    if len(text) < 3:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = text[1:3]
    cut = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=16, stop=[stop]
    ).choices[0]
    assert cut.message.content == text[: text.find(stop)]
    assert cut.finish_reason == "stop"


def test_concurrent_requests_are_batched_and_unchanged(client, server, world_dir):
    _, batcher = server
    image, audio = world_media(world_dir)
    prompts = ["Describe the image.", "How many shapes are there?", "Describe the sound."] * 3

    def ask(prompt: str) -> str:
        messages = [{"role": "user", "content": _content(prompt, image, audio)}]
        response = client.chat.completions.create(
            model=NAME, messages=messages, temperature=0.8, seed=3, max_tokens=10
        )
        return response.choices[0].message.content

    alone = {p: ask(p) for p in set(prompts)}
    before = len(batcher.batch_sizes)
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [alone[p] for p in prompts]
    assert max(batcher.batch_sizes[before:]) > 1


def test_models_health_and_local_path(client, server, world_dir):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    image, _ = world_media(world_dir)
    relative = image.relative_to(world_dir).as_posix()
    by_path = client.chat.completions.create(
        model=NAME,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": relative}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
        temperature=0,
        max_tokens=8,
    )
    by_data = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": _content("Describe the image.", image)}],
        temperature=0,
        max_tokens=8,
    )
    assert by_path.choices[0].message.content == by_data.choices[0].message.content


# ------------------------------------------------------------------------ bad requests


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _wav(seconds: float) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def _image_request(url: str, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    return {"model": NAME, "messages": [{"role": "user", "content": content}], **extra}


def _audio_request(data: str, fmt: str = "wav") -> dict:
    part = {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
    return {"model": NAME, "messages": [{"role": "user", "content": [part]}]}


_PNG_URL = "data:image/png;base64," + base64.b64encode(_png(8, 8)).decode()
_BOMB_URL = "data:image/png;base64," + base64.b64encode(_png(2000, 2000)).decode()
_HUGE_TEXT = {"model": NAME, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
OUTSIDE = "leaves the media directory"
BAD_REQUESTS = {  # case: (status, body, words the error message must hold)
    "over-size body": (413, _HUGE_TEXT, "over the limit"),
    "bad base64": (400, _image_request("data:image/png;base64,iVBOR!!w0KGgo="), "base64"),
    "wrong MIME": (400, _image_request(_PNG_URL.replace("png", "gif", 1)), "not allowed"),
    "MIME and data disagree": (400, _image_request(_PNG_URL.replace("png", "jpeg", 1)), "JPEG"),
    "pixel bomb": (400, _image_request(_BOMB_URL), "pixels is over the limit"),
    "over-long audio": (400, _audio_request(_wav(3.0)), "over the limit of 2.0 s"),
    "audio format": (400, _audio_request(_wav(0.5), "mp3"), "not allowed"),
    "remote URL": (400, _image_request("https://example.com/cat.png"), "remote media URLs"),
    "path traversal": (400, _image_request("../../etc/passwd"), OUTSIDE),
    "encoded traversal": (400, _image_request("%2e%2e/%2e%2e/etc/passwd"), OUTSIDE),
    "file URL traversal": (400, _image_request("file:///../../etc/passwd"), OUTSIDE),
    "unknown model": (404, {**_image_request(_PNG_URL), "model": "gpt-9"}, "not found"),
    "max_tokens over limit": (400, _image_request(_PNG_URL, max_tokens=10**5), "max_tokens"),
    "not JSON": (400, b"{nope", "not valid JSON"),
    "no messages": (400, {"model": NAME, "messages": []}, "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_4xx_and_the_server_stays_up(server, case):
    base, _ = server
    status, body, words = BAD_REQUESTS[case]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base}/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert "Traceback" not in response.text
    assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}"])
def test_api_key_is_required_except_for_health(server, header):
    base, _ = server
    headers = {"Authorization": header} if header else {}
    for response in (
        httpx.get(f"{base}/v1/models", headers=headers),
        httpx.post(f"{base}/v1/chat/completions", json=_image_request("x"), headers=headers),
    ):
        assert response.status_code == 401
        assert "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{base}/health").status_code == 200


def test_official_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000
        )


@pytest.fixture(scope="module")
def describe_image(trained_run: Path, world_dir: Path) -> Sample:
    """The processed prompt "Describe the image." about a world image (for batcher jobs)."""
    return world_prompt(trained_run / "model", world_dir, "Describe the image.")


def _short_and_long(batcher: DynamicBatcher, sample: Sample) -> tuple[Job, Job, list[str]]:
    """Submits together a one-token job and a long sampled one; returns both and the long
    one's text as streamed when the short one had its answer."""
    long_text: list[str] = []
    long_text_at_short_answer: list[str] = []
    short = Job(sample, GenerationConfig(max_new_tokens=1))
    # high-temperature sampling: the long row keeps going (an end-of-turn is unlikely)
    long_config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=3.0, seed=0)
    long = Job(sample, long_config, on_text=long_text.append)
    short.future.add_done_callback(lambda _: long_text_at_short_answer.append("".join(long_text)))
    batcher.submit_all([short, long])
    short.future.result(timeout=60)
    long.future.result(timeout=60)
    return short, long, long_text_at_short_answer


def test_jobs_holding_one_sample_share_one_prompt(describe_image):
    other = Sample(**{**vars(describe_image)})  # equal, but not the same object
    jobs = [Job(s, GenerationConfig()) for s in (describe_image, describe_image, other)]
    samples, copies = shared_prompts(jobs)
    assert [id(s) for s in samples] == [id(describe_image), id(other)]
    assert copies == [2, 1]
    assert shared_prompts(jobs[::-1])[1] == [1, 2]


def test_a_short_row_is_answered_before_its_batch_ends(server, describe_image):
    _, batcher = server
    before = len(batcher.batch_sizes)
    short, long, long_text_at_short_answer = _short_and_long(batcher, describe_image)
    assert short.future.result().completion_tokens == 1
    assert short.future.result().finish_reason == "length"
    assert long.future.result().completion_tokens > 2
    assert batcher.batch_sizes[before:] == [2]
    # the short row had its answer while the long row was still being generated
    assert len(long_text_at_short_answer[0]) < len(long.future.result().text)


def test_static_batches_answer_rows_as_they_end_too(server, trained_run, describe_image):
    """``continuous=False`` (what cross-attention models get): one ``generate`` call per
    batch, each answer still sent when its row ends, and the same answers."""
    _, continuous = server
    model, processor = load_model_dir(trained_run / "model")
    collator = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    static = DynamicBatcher(
        model.eval(), collator, max_batch_size=8, max_wait_ms=50, continuous=False
    )
    try:
        short, long, long_text_at_short_answer = _short_and_long(static, describe_image)
    finally:
        static.close()
    assert not static.continuous and static.batch_sizes == [2]
    assert short.future.result().completion_tokens == 1
    assert len(long_text_at_short_answer[0]) < len(long.future.result().text)
    _, same_long, _ = _short_and_long(continuous, describe_image)
    assert long.future.result() == same_long.future.result()


def test_waiting_jobs_are_prefilled_in_groups(trained_run, describe_image):
    """With continuous batching, a job that comes to an idle batcher starts at once; jobs
    that come while rows are decoding start once ``prefill_group`` of them can be prefilled
    together, or once the oldest has waited ``max_wait_ms``."""
    model, processor = load_model_dir(trained_run / "model")
    collator = Collator(processor.tokenizer.pad_token_id, "left", processor.image.size)
    with pytest.raises(ValueError, match="prefill_group must be between 1 and max_batch_size=4"):
        DynamicBatcher(model.eval(), collator, max_batch_size=4, prefill_group=5)
    default = DynamicBatcher(model, collator, max_batch_size=16)
    default.close()
    assert default.prefill_group == 8  # half of max_batch_size
    # a minute's wait for company: every start below is due to the rule, not to the clock
    batcher = DynamicBatcher(
        model.eval(), collator, max_batch_size=5, max_wait_ms=60_000, prefill_group=3
    )
    config = GenerationConfig(max_new_tokens=2)
    pieces: list[str] = []  # the long row's streamed text
    group: list[Future] = []
    sizes_before_the_third: list[list[int]] = []

    def on_text(text: str) -> None:  # runs on the batcher's thread, between two steps
        pieces.append(text)
        if len(pieces) == 1:  # the long row is decoding: two jobs come
            group.extend(batcher.submit(Job(describe_image, config)) for _ in range(2))
        elif len(pieces) == 4:  # steps later they still wait; a third comes
            sizes_before_the_third.append(list(batcher.batch_sizes))
            group.append(batcher.submit(Job(describe_image, config)))

    long_config = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=3.0, seed=1)
    try:
        started = time.monotonic()
        long = batcher.submit(Job(describe_image, long_config, on_text=on_text))
        assert long.result(timeout=60).completion_tokens > 10
        answers = [f.result(timeout=60) for f in group]
        assert time.monotonic() - started < 30  # nobody waited max_wait_ms
        assert sizes_before_the_third == [[1]]  # two of three wait
        assert batcher.batch_sizes == [1, 4]  # the three joined the long row together
        assert len({a.text for a in answers}) == 1  # the same prompt, greedy
        # rows free again, the next job starts alone at once
        alone = batcher.submit(Job(describe_image, config)).result(timeout=30)
        assert alone == answers[0] and batcher.batch_sizes == [1, 4, 1]
    finally:
        batcher.close()


def test_a_request_joins_the_rows_in_decoding(server, describe_image):
    _, batcher = server
    assert batcher.continuous
    sample = describe_image
    # made "long ago": due at once, it does not wait max_wait_ms for company
    late = Job(sample, GenerationConfig(max_new_tokens=2), arrived=time.monotonic() - 60)
    pieces: list[str] = []

    def on_text(text: str) -> None:  # the late job comes once the long row is decoding
        pieces.append(text)
        if len(pieces) == 1:
            batcher.submit(late)

    config = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=3.0, seed=1)
    long = Job(sample, config, on_text=on_text)
    before = len(batcher.batch_sizes)
    batcher.submit(long)
    late_answer = late.future.result(timeout=60)
    assert (late_answer.completion_tokens, late_answer.finish_reason) == (2, "length")
    streamed_by_then = len("".join(pieces))
    assert long.future.result(timeout=60).completion_tokens > 10
    # the late job was prefilled alone, then decoded in the same batch as the long row,
    # and its answer came while the long row went on
    assert batcher.batch_sizes[before:] == [1, 2]
    assert streamed_by_then < len(long.future.result().text)
    alone = Job(sample, GenerationConfig(max_new_tokens=2))
    assert batcher.submit(alone).result(timeout=60).text == late_answer.text
