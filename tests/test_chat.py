"""Chat: one-shot and interactive, streamed, with media."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from helpers import world_media
from hydra import compose, initialize_config_dir

from data_modules.conversation import ConversationDataset
from mmfuse.chat import ChatSession, chat, run_interactive
from mmfuse.config import CONFIG_DIR
from mmfuse.generation import GenerationConfig
from mmfuse.model_dir import load_model_dir
from mmfuse.processing.errors import RecordError
from mmfuse.processing.text import message_text


def _media(world: Path) -> tuple[str, str]:
    image, audio = world_media(world)
    return str(image), str(audio)


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


def test_system_save_reset_load_and_continue(
    trained_run: Path, world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, _ = _media(world_dir)
    monkeypatch.chdir(world_dir)  # attach a path relative to the working directory
    relative_image = os.path.relpath(image, world_dir)
    model, processor = load_model_dir(trained_run / "model")
    generation = GenerationConfig(max_new_tokens=6)
    transcript = tmp_path / "chats" / "transcript.jsonl"
    session = ChatSession(model, processor, generation)
    script = (
        "/system Answer briefly.\n"
        f"/image {relative_image}\n"
        "What color is the circle?\n"
        f"/save {transcript}\n"
        "/reset\n"
        f"/load {transcript}\n"
        "How many shapes are there?\n"
        f"/save {transcript}\n"
    )
    out = io.StringIO()
    run_interactive(session, io.StringIO(script), out, stream=True)
    text = out.getvalue()
    assert "error:" not in text, text
    assert "(system message set" in text and "(conversation reset)" in text
    assert text.count("(conversation saved to") == 2 and f"{transcript}:1" in text
    assert text.count("mmfuse> ") == 2

    first, second = (json.loads(line) for line in transcript.read_text().splitlines())
    assert first["task"] == "chat" and first["id"] != second["id"]
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"] == [{"type": "text", "text": "Answer briefly."}]
    image_part, question = first["messages"][1]["content"]
    assert image_part["type"] == "image" and not os.path.isabs(image_part["path"])
    assert (transcript.parent / image_part["path"]).resolve() == Path(image).resolve()
    assert question == {"type": "text", "text": "What color is the circle?"}
    expected = ChatSession(model, processor, generation, system="Answer briefly.")
    expected.attach("image", image)
    answer = expected.ask("What color is the circle?")
    assert first["messages"][2]["content"] == [{"type": "text", "text": answer}]

    # the loaded conversation went on: media resolved against the transcript, system kept
    assert second["messages"][:3] == first["messages"]
    assert [m["role"] for m in second["messages"][3:]] == ["user", "assistant"]
    assert session.system == "Answer briefly." and len(session.messages) == 5
    assert Path(session.messages[1]["content"][0]["path"]) == Path(image).resolve()
    # the transcript is training data as it stands, unless the (barely trained) model
    # answered nothing: then training names the empty reply (a chat reloads it all the same)
    dataset = ConversationDataset(transcript, processor)
    replies = [message_text(m) for m in second["messages"] if m["role"] == "assistant"]
    if all(r.strip() for r in replies):
        assert [int((dataset[i].labels != -100).sum()) > 0 for i in range(2)] == [True, True]
    else:
        with pytest.raises(RecordError, match="empty text: assistant turn"):
            dataset[1]


def test_bad_transcripts_are_reported_and_the_session_goes_on(
    trained_run: Path, tmp_path: Path
) -> None:
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    answer = [{"role": "assistant", "content": "red"}]
    image = [{"role": "user", "content": [{"type": "image", "path": "nope.png"}]}]
    cases = {
        tmp_path / "absent.jsonl": "no such file",
        write("empty.jsonl", "\n"): "no record",
        write("bad.jsonl", '{"messages": []}\n{not json\n\n'): ":2: invalid JSON",
        write("list.jsonl", "[1, 2]\n"): ":1: a record must be a JSON object",
        write("schema.jsonl", '{"id": "x", "messages": "hi"}\n'): ":1: record 'x'",
        write("media.jsonl", json.dumps({"messages": image + answer})): "image file not found",
    }
    model, processor = load_model_dir(trained_run / "model")
    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=4), system="Hi.")
    script = "/image\n/save\n" + f"/save {tmp_path / 'early.jsonl'}\n"
    script += "".join(f"/load {path}\n" for path in cases) + "/load\nhello\n"
    out = io.StringIO()
    run_interactive(session, io.StringIO(script), out, stream=False)
    lines = [line for line in out.getvalue().splitlines() if "error:" in line]
    assert len(lines) == 1 + len(cases)
    assert "nothing to save yet" in lines[0] and not (tmp_path / "early.jsonl").exists()
    for line, (path, reason) in zip(lines[1:], cases.items(), strict=True):
        assert str(path) in line and reason in line, line
    assert out.getvalue().count("usage: /image PATH") == 1 and session.pending == []
    assert out.getvalue().count("usage: /save FILE") == 1
    assert out.getvalue().count("usage: /load FILE") == 1
    assert out.getvalue().count("mmfuse> ") == 1, "the session answered after the errors"
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
