"""lmms-eval's OpenAI-compatible model against mmfuse-serve: a fake harness builds requests
the way lmms-eval's ``openai`` / ``openai_compatible`` model does (the task's text first, then
each image as a base64 PNG data URL, each audio file as ``input_audio``; ``max_tokens`` = the
task's ``max_new_tokens`` or 1024, ``temperature`` 0), sends them with the ``openai`` client to
a server running in this process, and scores the answers (see docs/lmms_eval.md)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import uvicorn
from hydra import compose, initialize_config_dir
from PIL import Image

from mmfuse.config import CONFIG_DIR
from mmfuse.evaluation.runner import evaluate
from mmfuse.serve.cli import build_server
from tests.eval_helpers import eval_cfg, memorised_model, read_jsonl
from tests.helpers import MEMORISED_ANSWERS, mixed_records, write_media

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "mmfuse-tiny"


def _text_first(record: dict) -> dict:
    """The record with its media after the text, the order lmms-eval's simple model sends."""
    user = record["messages"][0]
    parts = user["content"]
    user["content"] = [p for p in parts if p["type"] == "text"] + [
        p for p in parts if p["type"] != "text"
    ]
    return record


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("media")
    write_media(base)
    return base


@pytest.fixture(scope="module")
def records() -> list[dict]:
    out = [_text_first(r) for r in mixed_records()]
    for record, answer in zip(out, MEMORISED_ANSWERS, strict=True):
        record["messages"][1]["content"][0]["text"] = answer
    return out


@pytest.fixture(scope="module")
def model_dir(records, media: Path, tmp_path_factory) -> Path:
    return memorised_model(tmp_path_factory.mktemp("memorised"), records, media)


@pytest.fixture(scope="module")
def base_url(model_dir: Path):
    """mmfuse-serve on a free loopback port, set up as docs/lmms_eval.md says."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "serve",
            overrides=[
                f"ckpt={model_dir}",
                f"model_name={NAME}",
                "threads=1",
                "requests.max_tokens=4096",  # lmms-eval asks for up to 4096 (1024 by default)
            ],
        )
    app, batcher = build_server(cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)
    batcher.close()


# ----------------------------------------------------------------------------- the fake harness


def _encode_image(path: Path) -> str:
    """lmms-eval's ``encode_image``: open, convert to RGB, save as PNG, base64."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def lmms_eval_payload(model_version: str, context: str, visuals: list[Path], gen_kwargs: dict):
    """The request body lmms-eval's OpenAI-compatible model builds for one document."""
    payload = {
        "model": model_version,
        "messages": [{"role": "user", "content": [{"type": "text", "text": context}]}],
        "max_tokens": min(gen_kwargs.get("max_new_tokens", 1024), 4096),
        "temperature": gen_kwargs.get("temperature", 0),
    }
    for visual in visuals:
        if visual.suffix == ".wav":
            data = base64.b64encode(visual.read_bytes()).decode("utf-8")
            part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
        else:
            url = f"data:image/png;base64,{_encode_image(visual)}"
            part = {"type": "image_url", "image_url": {"url": url}}
        payload["messages"][0]["content"].append(part)
    return payload


def fake_harness(base_url: str, docs: list[dict], gen_kwargs: dict) -> tuple[list[str], float]:
    """Answers every document through the server, then scores exact match as a task's
    ``process_results`` would: (answers, accuracy)."""
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
    answers = []
    for doc in docs:
        payload = lmms_eval_payload(NAME, doc["question"], doc["visuals"], gen_kwargs)
        response = client.chat.completions.create(**payload)
        answers.append(response.choices[0].message.content)
    hits = [a.strip().lower() == d["answer"].lower() for a, d in zip(answers, docs, strict=True)]
    return answers, sum(hits) / len(hits)


def _docs(records: list[dict], media: Path) -> list[dict]:
    docs = []
    for record in records:
        parts = record["messages"][0]["content"]
        docs.append(
            {
                "question": next(p["text"] for p in parts if p["type"] == "text"),
                "visuals": [media / p["path"] for p in parts if p["type"] != "text"],
                "answer": record["messages"][1]["content"][0]["text"],
            }
        )
    return docs


def test_lmms_eval_style_requests_get_the_answers(base_url: str, records, media: Path) -> None:
    docs = _docs(records, media)
    answers, accuracy = fake_harness(base_url, docs, {"max_new_tokens": 16})
    assert answers == MEMORISED_ANSWERS
    assert accuracy == 1.0
    # lmms-eval's defaults when a task sets no generation kwargs: 1024 tokens, greedy
    answers, _ = fake_harness(base_url, docs[1:2], {})
    assert answers == MEMORISED_ANSWERS[1:2]


def test_served_answers_equal_mmfuse_eval(
    base_url: str, records, media: Path, model_dir: Path, tmp_path: Path
) -> None:
    data = media / "text_first.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    evaluate(
        eval_cfg(
            f"ckpt={model_dir}",
            f"data.path={data}",
            f"output_dir={tmp_path}",
            "cache_dir=null",
            "generation.max_new_tokens=16",
        )
    )
    predictions = [r["prediction"] for r in read_jsonl(tmp_path / "predictions.jsonl")]
    answers, _ = fake_harness(base_url, _docs(records, media), {"max_new_tokens": 16})
    assert answers == predictions
