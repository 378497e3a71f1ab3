"""Tests of mmfuse.processing.processor (record -> Sample) and its media loaders."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (
    SAMPLE_RATE,
    fresh_tokenizer,
    processor,
    record,
    supervised_text,
    tokenizer,
    write_media,
    write_png,
    write_wav,
)

from mmfuse.processing.audio import AudioProcessor
from mmfuse.processing.collate import Collator
from mmfuse.processing.errors import RecordError
from mmfuse.processing.image import ImageProcessor
from mmfuse.processing.processor import Processor
from mmfuse.processing.text import (
    AUDIO_TOKEN,
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    encode_conversation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCE = "data/train.jsonl"


@pytest.fixture
def base(tmp_path):
    write_media(tmp_path)
    return tmp_path


def _ids(text: str) -> list[int]:
    return tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_sample_fields_and_shapes(base):
    rec = record(
        "r1", "What color is the circle?", "red", image="a.png", audio="s.wav", task="image/color"
    )
    sample = processor()(rec, base, source=SOURCE)
    assert sample.id == "r1" and sample.task == "image/color" and sample.reference is None
    assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
    assert sample.audio.shape == (SAMPLE_RATE,) and sample.audio.dtype == torch.float32
    assert sample.input_ids.dtype == torch.long and sample.labels.shape == sample.input_ids.shape
    assert sample.prompt_ids.tolist() == _ids("What color is the circle?")
    assert supervised_text(tokenizer(), sample.labels.tolist()) == "red<|im_end|>"
    ids = sample.input_ids.tolist()
    assert ids.count(tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    assert ids.count(tokenizer().convert_tokens_to_ids(AUDIO_TOKEN)) == 1


def test_pixel_values_are_normalised(base):
    sample = processor()(record("r", "q?", "red", image="a.png"), base)
    # red circle in the centre, grey (128) background; mean = std = 0.5
    assert torch.allclose(sample.image[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]))
    grey = (128 / 255 - 0.5) / 0.5
    assert torch.allclose(sample.image[:, 0, 0], torch.full((3,), grey), atol=1e-6)


def test_image_of_other_size_is_resized(tmp_path):
    write_png(tmp_path / "big.png", (0, 255, 0), size=96)
    pixels = ImageProcessor(size=64).load(tmp_path / "big.png")
    assert pixels.shape == (3, 64, 64)
    assert torch.allclose(pixels[:, 32, 32], torch.tensor([-1.0, 1.0, -1.0]), atol=1e-2)


def test_audio_is_normalised(base):
    sample = processor()(record("r", "q?", "low", audio="s.wav"), base)
    assert abs(float(sample.audio.mean())) < 1e-4
    assert float(sample.audio.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_audio_8khz_stereo_is_resampled_to_16khz_mono(tmp_path):
    write_wav(tmp_path / "st.wav", freq=440.0, seconds=1.0, rate=8000, channels=2)
    wave = AudioProcessor(sample_rate=SAMPLE_RATE, normalize=False).load(tmp_path / "st.wav")
    assert wave.shape == (SAMPLE_RATE,)
    # still a 440 Hz tone: the spectrum peaks at 440 Hz (1 s -> 1 Hz per bin)
    spectrum = torch.fft.rfft(wave).abs()
    assert int(spectrum.argmax()) == 440
    assert float(wave.abs().max()) == pytest.approx(0.5, abs=0.02)


def test_audio_longer_than_max_seconds_is_cropped(tmp_path):
    write_wav(tmp_path / "long.wav", seconds=1.0)
    wave = AudioProcessor(sample_rate=SAMPLE_RATE, max_seconds=0.25).load(tmp_path / "long.wav")
    assert wave.shape == (4000,)


def _expect_record_error(proc, rec, base, reason):
    with pytest.raises(RecordError) as info:
        proc(rec, base, source=SOURCE)
    message = str(info.value)
    assert SOURCE in message and repr(rec.get("id", "<no id>")) in message
    assert reason in message, message
    assert info.value.source == SOURCE
    return message


def test_missing_image_file(base):
    message = _expect_record_error(
        processor(), record("r7", "q?", "red", image="nope.png"), base, "image file not found"
    )
    assert "nope.png" in message


def test_unreadable_image(base):
    (base / "bad.png").write_bytes(b"this is not a png at all" * 10)
    message = _expect_record_error(
        processor(), record("r8", "q?", "red", image="bad.png"), base, "unreadable image"
    )
    assert "bad.png" in message


def test_truncated_image(base):
    data = (base / "a.png").read_bytes()
    (base / "cut.png").write_bytes(data[: len(data) // 2])
    _expect_record_error(
        processor(), record("r8b", "q?", "red", image="cut.png"), base, "image file is truncated"
    )


def test_empty_audio(base):
    sf.write(str(base / "empty.wav"), np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    _expect_record_error(
        processor(), record("r9b", "q?", "low", audio="empty.wav"), base, "empty audio"
    )


def test_unreadable_audio(base):
    (base / "bad.wav").write_bytes(b"RIFF garbage bytes, no wave here" * 10)
    message = _expect_record_error(
        processor(), record("r9", "q?", "low", audio="bad.wav"), base, "unreadable audio"
    )
    assert "bad.wav" in message


def test_missing_audio_file(base):
    _expect_record_error(
        processor(), record("r10", "q?", "low", audio="nope.wav"), base, "audio file not found"
    )


def test_no_assistant_turn(base):
    rec = record("r11", "q?", "red")
    rec["messages"] = rec["messages"][:1]
    _expect_record_error(processor(), rec, base, "no assistant turn")


def test_part_of_unknown_type(base):
    rec = record("r12", "q?", "red")
    rec["messages"][0]["content"].append({"type": "video", "path": "v.mp4"})
    _expect_record_error(processor(), rec, base, "unknown type")


def test_bad_role_and_bad_messages(base):
    rec = record("r13", "q?", "red")
    rec["messages"][0]["role"] = "robot"
    _expect_record_error(processor(), rec, base, "needs a role")
    _expect_record_error(processor(), {"id": "r14", "messages": []}, base, "non-empty list")


def test_two_images_in_one_record(base):
    rec = record("r15", "q?", "red", image="a.png")
    rec["messages"][0]["content"].append({"type": "image", "path": "b.png"})
    _expect_record_error(processor(), rec, base, "more than one image")


def test_record_without_id_is_named(base):
    rec = record("x", "q?", "red", image="nope.png")
    del rec["id"]
    _expect_record_error(processor(), rec, base, "image file not found")


def test_too_long_record(base):
    proc = processor(max_length=10)
    _expect_record_error(
        proc, record("r16", "What color is the circle?", "red"), base, "max_length=10"
    )


def _multi_turn(record_id: str = "m1") -> dict:
    rec = record(record_id, "What color is the circle?", "red", image="a.png")
    rec["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
    ]
    return rec


def test_template_without_generation_block_gives_assistant_only_labels(base):
    """Rendering messages[:i] and messages[:i+1] finds each answer: the same labels as the
    template's own generation blocks."""
    tok = fresh_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", ""
    )
    assert "{%- generation" not in tok.chat_template and "endgeneration" not in tok.chat_template
    proc = Processor(tok, ImageProcessor(64), AudioProcessor(SAMPLE_RATE))
    for rec in (record("r17", "What color?", "red", image="a.png"), _multi_turn()):
        sample, reference = proc(rec, base), processor()(rec, base)
        assert sample.input_ids.tolist() == reference.input_ids.tolist()
        assert sample.labels.tolist() == reference.labels.tolist()
    assert supervised_text(tok, proc(_multi_turn(), base).labels.tolist()) == (
        "red<|im_end|>circle<|im_end|>"
    )
    sample = proc(record("r17", "What color?", "red"), base, for_generation=True)
    assert sample.reference == "red" and (sample.labels == IGNORE_INDEX).all()


# A Qwen2-style template: string content only, a default system prompt, a newline after each
# end-of-turn token (as in Qwen2/Qwen2.5 tokenizers' tokenizer_config.json).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Llama-3-style template (header tokens, a begin-of-text token, trimmed content).
LLAMA3_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_end|>\n\n' + message['content'] | trim + "
    "'<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", [QWEN2_TEMPLATE, LLAMA3_TEMPLATE], ids=["qwen2", "llama3"])
def test_real_templates_without_generation_blocks(base, template):
    tok = fresh_tokenizer()
    tok.chat_template = template
    proc = Processor(tok, ImageProcessor(64), AudioProcessor(SAMPLE_RATE))
    sample = proc(_multi_turn(), base)
    text = tok.decode(sample.input_ids)
    # list content became text, the image a placeholder token; no Python list repr
    assert "<|image|>What color is the circle?" in text and "'type'" not in text
    assert sample.input_ids.tolist().count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    assert supervised_text(tok, sample.labels.tolist()) == "red<|im_end|>circle<|im_end|>"
    prompt = proc(_multi_turn(), base, for_generation=True)
    assert tok.decode(prompt.input_ids).endswith(
        "<|im_start|>assistant" + ("\n" if template is QWEN2_TEMPLATE else "<|im_end|>\n\n")
    )
    assert prompt.reference == "circle"


def test_for_generation_keeps_last_answer_as_reference(base):
    rec = record("g1", "What color is the circle?", "red", image="a.png")
    rec["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
    ]
    sample = processor()(rec, base, for_generation=True)
    assert sample.reference == "circle"
    assert (sample.labels == IGNORE_INDEX).all()
    expected, _ = encode_conversation(tokenizer(), rec["messages"][:3], add_generation_prompt=True)
    assert sample.input_ids.tolist() == expected
    text = tokenizer().decode(sample.input_ids)
    assert "circle<|im_end|>" not in text and "red<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert sample.prompt_ids.tolist() == _ids("What color is the circle?\nWhat shape is it?")
    assert sample.image is not None
    # training on the same record supervises both answers
    train = processor()(rec, base)
    assert supervised_text(tokenizer(), train.labels.tolist()) == "red<|im_end|>circle<|im_end|>"


def test_references_go_into_sample_and_batch(base):
    with_list = {**record("v1", "Color?", "red", image="a.png"), "references": ["red", "dark red"]}
    plain = record("v2", "Color?", "blue", image="b.png")
    samples = [processor()(r, base, for_generation=True) for r in (with_list, plain)]
    assert [s.all_references for s in samples] == [["red", "dark red"], ["blue"]]
    assert processor()(plain, base).all_references is None  # training: no references
    batch = Collator(tokenizer().pad_token_id, "left")(samples)
    assert batch.references == ["red", "blue"]
    assert batch.all_references == [["red", "dark red"], ["blue"]]
    for bad in ([], "red", ["red", 3]):
        with pytest.raises(RecordError, match="'references' must be a non-empty list"):
            processor()({**plain, "references": bad}, base, for_generation=True)


def test_drop_modalities_removes_parts_and_placeholders(base):
    # the dropped media files need not even exist
    rec = record("d1", "How many?", "two", image="missing.png", audio="missing.wav")
    tok = tokenizer()
    image_id, audio_id = (tok.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, AUDIO_TOKEN))
    sample = processor()(rec, base, drop_modalities=("image", "audio"))
    assert sample.image is None and sample.audio is None
    assert image_id not in sample.input_ids.tolist() and audio_id not in sample.input_ids.tolist()
    assert supervised_text(tok, sample.labels.tolist()) == "two<|im_end|>"

    rec = record("d2", "How many?", "two", image="a.png", audio="s.wav")
    only_audio = processor()(rec, base, drop_modalities=("image",))
    assert only_audio.image is None and only_audio.audio is not None
    ids = only_audio.input_ids.tolist()
    assert image_id not in ids and ids.count(audio_id) == 1
    full = processor()(rec, base)
    assert len(full.input_ids) == len(only_audio.input_ids) + 1


def test_prompt_for_chat(base):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": "a.png"},
                {"type": "text", "text": "What color is the circle?"},
            ],
        },
    ]
    sample = processor().prompt(messages, base_dir=base)
    assert sample.id == "<chat>" and sample.reference is None
    assert (sample.labels == IGNORE_INDEX).all()
    expected, _ = encode_conversation(tokenizer(), messages, add_generation_prompt=True)
    assert sample.input_ids.tolist() == expected
    assert tokenizer().decode(sample.input_ids).endswith("<|im_start|>assistant\n")
    assert sample.image.shape == (3, 64, 64) and sample.audio is None
    assert sample.prompt_ids.tolist() == _ids("What color is the circle?")


def test_prompt_errors_are_record_errors(base):
    with pytest.raises(RecordError, match="<chat>.*image file not found"):
        processor().prompt(
            [{"role": "user", "content": [{"type": "image", "path": "x.png"}]}], base_dir=base
        )
    with pytest.raises(RecordError, match="unknown type"):
        processor().prompt([{"role": "user", "content": [{"type": "gif"}]}])


def test_prompt_too_long_is_record_error():
    with pytest.raises(RecordError, match="max_length"):
        processor(max_length=5).prompt([{"role": "user", "content": "What color is the circle?"}])


def test_last_answer_only_and_last_prompt_turn(base):
    rec = _multi_turn()
    both = processor()(rec, base)
    assert supervised_text(tokenizer(), both.labels.tolist()) == "red<|im_end|>circle<|im_end|>"
    assert both.prompt_ids.tolist() == _ids("What color is the circle?\nWhat shape is it?")
    proc = Processor(
        tokenizer(), ImageProcessor(64), AudioProcessor(SAMPLE_RATE), prompt_turns="last"
    )
    last = proc(rec, base, last_answer_only=True)
    assert last.input_ids.tolist() == both.input_ids.tolist()
    assert supervised_text(tokenizer(), last.labels.tolist()) == "circle<|im_end|>"
    assert last.prompt_ids.tolist() == _ids("What shape is it?")
    with pytest.raises(ValueError, match="prompt_turns must be one of"):
        Processor(tokenizer(), ImageProcessor(64), AudioProcessor(SAMPLE_RATE), prompt_turns="x")
