"""Chat: one-shot and interactive, streamed, with media."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from mmfuse.chat import ChatSession, chat, run_interactive
from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig
from mmfuse.model_dir import load_model_dir


def _media(world: Path) -> tuple[str, str]:
    record = next(
        json.loads(x)
        for x in (world / "test.jsonl").read_text().splitlines()
        if json.loads(x)["task"].startswith("both/")
    )
    parts = record["messages"][0]["content"]
    return str(world / parts[0]["path"]), str(world / parts[1]["path"])


def test_one_shot_equals_session_and_streams(trained_run: Path, world_dir: Path) -> None:
    image, audio = _media(world_dir)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "chat",
            overrides=[
                f"ckpt={trained_run / 'model'}",
                "prompt=Describe the image.",
                f"image={image}",
                f"audio={audio}",
                "generation.max_new_tokens=12",
            ],
        )
    out = io.StringIO()
    answer = chat(cfg, stdout=out)
    assert out.getvalue().strip() == answer.strip()
    model, processor = load_model_dir(trained_run / "model")
    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=12, seed=0))
    session.attach("image", image)
    session.attach("audio", audio)
    pieces: list[str] = []
    assert session.ask("Describe the image.", pieces.append) == answer
    assert "".join(pieces) == answer
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_interactive_multi_turn_commands(trained_run: Path, world_dir: Path) -> None:
    image, _ = _media(world_dir)
    model, processor = load_model_dir(trained_run / "model")
    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=6))
    script = (
        f"/image {image}\nWhat color is the circle?\nHow many shapes are there?\n/bogus\n/reset\n"
    )
    out = io.StringIO()
    run_interactive(session, io.StringIO(script), out, stream=True)
    text = out.getvalue()
    assert text.count("mmfuse> ") == 2 and "(image attached" in text
    assert "unknown command /bogus" in text and "(conversation reset)" in text
    assert session.messages == []


def test_sampling_settings_and_missing_media(trained_run: Path) -> None:
    model, processor = load_model_dir(trained_run / "model")
    config = GenerationConfig(
        max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=3
    )
    first = ChatSession(model, processor, config).ask("Describe the sound.")
    assert ChatSession(model, processor, config).ask("Describe the sound.") == first
    session = ChatSession(model, processor, config)
    session.attach("audio", "/no/such/file.wav")
    out = io.StringIO()
    run_interactive(session, io.StringIO("hello\n"), out, stream=False)
    assert "error:" in out.getvalue() and "audio file not found" in out.getvalue()
    assert session.messages == [] and session.pending == []
