"""Tests of mmfuse.processing.collate (Samples -> Batch)."""

from __future__ import annotations

import pytest
import torch

from mmfuse.processing.collate import Collator, pad_sequences
from mmfuse.types import Sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAD = 0


def _sample(sid, n_tokens, image=None, audio=None, n_prompt=2, first_label=None):
    ids = torch.arange(10, 10 + n_tokens)
    labels = torch.full((n_tokens,), -100)
    labels[-2:] = ids[-2:]
    return Sample(
        id=sid,
        task=f"task/{sid}",
        input_ids=ids,
        labels=labels,
        prompt_ids=torch.arange(50, 50 + n_prompt),
        image=image,
        audio=audio,
        reference=f"ref-{sid}",
    )


@pytest.fixture
def batch_samples():
    torch.manual_seed(0)
    image = torch.randn(3, 8, 8)
    audio_long, audio_short = torch.randn(7), torch.randn(4)
    return [
        _sample("text", 3, n_prompt=3),
        _sample("img", 5, image=image, n_prompt=1),
        _sample("aud", 4, audio=audio_long, n_prompt=0),
        _sample("both", 2, image=image * 2, audio=audio_short),
    ]


def test_pad_sequences_right_and_left():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    right = pad_sequences(seqs, -1, "right")
    left = pad_sequences(seqs, -1, "left")
    assert right.tolist() == [[1, 2, 3], [4, -1, -1], [-1, -1, -1]]
    assert left.tolist() == [[1, 2, 3], [-1, -1, 4], [-1, -1, -1]]
    # all empty: one padding column so that shapes stay valid
    assert pad_sequences([torch.zeros(0), torch.zeros(0)], 0.0).shape == (2, 1)


def test_right_padding(batch_samples):
    batch = Collator(PAD, "right", image_size=8)(batch_samples)
    assert batch.input_ids.shape == (4, 5)
    assert batch.input_ids[0].tolist() == [10, 11, 12, PAD, PAD]
    assert batch.input_ids[1].tolist() == [10, 11, 12, 13, 14]
    assert batch.input_ids[3].tolist() == [10, 11, PAD, PAD, PAD]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0],
    ]
    assert batch.labels[0].tolist() == [-100, 11, 12, -100, -100]
    assert batch.labels[3].tolist() == [10, 11, -100, -100, -100]
    assert batch.ids == ["text", "img", "aud", "both"]
    assert batch.tasks == ["task/text", "task/img", "task/aud", "task/both"]
    assert batch.references == ["ref-text", "ref-img", "ref-aud", "ref-both"]
    assert len(batch) == 4


def test_left_padding(batch_samples):
    batch = Collator(PAD, "left", image_size=8)(batch_samples)
    assert batch.input_ids[0].tolist() == [PAD, PAD, 10, 11, 12]
    assert batch.input_ids[3].tolist() == [PAD, PAD, PAD, 10, 11]
    assert batch.attention_mask.tolist() == [
        [0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1],
    ]
    assert batch.labels[0].tolist() == [-100, -100, -100, 11, 12]
    # every row's last column is a real token: generation appends after it
    assert (batch.attention_mask[:, -1] == 1).all()
    # the prompt for the text encoder stays right-padded
    assert batch.prompt_ids[1].tolist() == [50, PAD, PAD]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]]


def test_media_flags_and_zeros(batch_samples):
    batch = Collator(PAD, "right", image_size=8)(batch_samples)
    assert batch.has_image.tolist() == [False, True, False, True]
    assert batch.has_audio.tolist() == [False, False, True, True]
    assert batch.has_image.dtype == torch.bool and batch.has_audio.dtype == torch.bool
    assert batch.pixel_values.shape == (4, 3, 8, 8)
    assert torch.equal(batch.pixel_values[1], batch_samples[1].image)
    assert torch.equal(batch.pixel_values[3], batch_samples[3].image)
    assert (batch.pixel_values[0] == 0).all() and (batch.pixel_values[2] == 0).all()
    assert batch.audio_values.shape == (4, 7)
    assert batch.audio_lengths.tolist() == [0, 0, 7, 4]
    assert torch.equal(batch.audio_values[2], batch_samples[2].audio)
    assert torch.equal(batch.audio_values[3, :4], batch_samples[3].audio)
    assert (batch.audio_values[3, 4:] == 0).all()
    assert (batch.audio_values[:2] == 0).all()


def test_text_only_batch_uses_image_size():
    batch = Collator(PAD, "right", image_size=16)([_sample("a", 3), _sample("b", 2)])
    assert batch.pixel_values.shape == (2, 3, 16, 16) and not batch.has_image.any()
    assert batch.audio_values.shape == (2, 1) and batch.audio_lengths.tolist() == [0, 0]
    assert not batch.has_audio.any()


def test_images_of_different_shapes_raise():
    samples = [
        _sample("a", 2, image=torch.zeros(3, 8, 8)),
        _sample("b", 2, image=torch.zeros(3, 4, 4)),
    ]
    with pytest.raises(ValueError, match="different shapes"):
        Collator(PAD)(samples)


def test_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        Collator(PAD, "middle")


def test_batch_to_moves_tensors_and_keeps_metadata(batch_samples):
    batch = Collator(PAD, "right", image_size=8)(batch_samples)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.ids == batch.ids
