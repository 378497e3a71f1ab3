"""Media processing: the built-in world's outputs unchanged, every image mode to RGB, resizing
and training-only augmentation (torchvision v2), audio resampling, mono, normalisation and
long clips (crop, chunk, skip), and augmentation seeded per (seed, epoch, index)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from helpers import SAMPLE_RATE, processor, record, sine, write_png, write_wav
from PIL import Image

from data_modules.conversation import ConversationDataset
from data_modules.sampler import EpochIndex
from mmfuse.encoding import encode_audio_chunks
from mmfuse.modules.encoders import AudioEncoder
from mmfuse.processing.audio import AudioProcessor
from mmfuse.processing.errors import AUDIO_TOO_LONG, MediaError
from mmfuse.processing.image import ImageProcessor
from mmfuse.processing.processor import Processor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------- the world stays bit-identical


def _old_image(path, size=64):
    """The image loading before this change (PIL convert, bicubic resize, /255, mean 0.5)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return (pixels - 0.5) / 0.5


def _old_audio(path, rate=SAMPLE_RATE, max_seconds=10.0):
    """The audio loading before this change (mean of channels, resample, crop, z-score)."""
    data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    signal = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1), dtype=np.float32))
    if file_rate != rate:
        signal = AF.resample(signal, file_rate, rate)
    signal = signal[: int(max_seconds * rate)]
    return (signal - signal.mean()) / torch.sqrt(signal.var(unbiased=False) + 1e-7)


def test_world_media_are_bit_identical(world_dir):
    records = [json.loads(line) for line in (world_dir / "train.jsonl").read_text().splitlines()]
    images = audios = 0
    proc = processor()
    for rec in records[:40]:
        sample = proc(rec, world_dir)
        for part in rec["messages"][0]["content"]:
            if part["type"] == "image":
                assert torch.equal(sample.image, _old_image(world_dir / part["path"]))
                images += 1
            elif part["type"] == "audio":
                assert torch.equal(sample.audio, _old_audio(world_dir / part["path"]))
                audios += 1
    assert images and audios


def test_resized_image_matches_the_previous_resize(tmp_path):
    write_png(tmp_path / "big.png", (0, 200, 0), size=96)
    assert torch.equal(
        ImageProcessor(64).load(tmp_path / "big.png"), _old_image(tmp_path / "big.png")
    )


# ------------------------------------------------------------------------ modes to RGB


def _load(img: Image.Image, tmp_path, name="x.png", **kwargs) -> torch.Tensor:
    path = tmp_path / name
    img.save(path)
    return ImageProcessor(size=8, **kwargs).load(path)


def _rgb(pixels: torch.Tensor, y: int = 0, x: int = 0) -> list[int]:
    """Normalised pixels (mean = std = 0.5) back to 0..255 at (y, x)."""
    return [round(float(v)) for v in (pixels[:, y, x] * 0.5 + 0.5) * 255]


def test_grayscale_and_palette_become_rgb(tmp_path):
    grey = _load(Image.new("L", (8, 8), 100), tmp_path)
    assert grey.shape == (3, 8, 8) and _rgb(grey) == [100, 100, 100]
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert _rgb(_load(palette, tmp_path)) == [10, 20, 30]
    bits = _load(Image.new("1", (8, 8), 1), tmp_path)
    assert _rgb(bits) == [255, 255, 255]


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    array = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(array)
    assert img.mode.startswith("I;16")
    assert _rgb(_load(img, tmp_path)) == [127, 127, 127]


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow
    assert _rgb(_load(cmyk, tmp_path, "x.tiff")) == [255, 0, 0]


@pytest.mark.parametrize("background,expected", [("white", 255), ("black", 0)])
def test_transparency_is_composited_on_the_background(tmp_path, background, expected):
    rgba = Image.new("RGBA", (8, 8), (200, 10, 10, 0))
    rgba.putpixel((1, 1), (200, 10, 10, 255))
    pixels = _load(rgba, tmp_path, alpha_background=background)
    assert _rgb(pixels) == [expected] * 3  # fully transparent: the background
    assert _rgb(pixels, 1, 1) == [200, 10, 10]  # opaque: its own colour
    half = _load(Image.new("LA", (8, 8), (0, 128)), tmp_path, alpha_background=background)
    assert _rgb(half) == [round(expected * 127 / 255)] * 3
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([50, 60, 70] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert _rgb(_load(palette, tmp_path, alpha_background=background)) == [expected] * 3
    with pytest.raises(ValueError, match="alpha_background"):
        ImageProcessor(alpha_background="grey")


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = (255, 0, 0)  # left half red
    img = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 3  # shown rotated by 180 degrees
    img.save(tmp_path / "rot.png", exif=exif)
    pixels = ImageProcessor(size=8).load(tmp_path / "rot.png")
    assert _rgb(pixels, 0, 0) == [0, 0, 0] and _rgb(pixels, 0, 7) == [255, 0, 0]
    raw = ImageProcessor(size=8, exif_transpose=False).load(tmp_path / "rot.png")
    assert _rgb(raw, 0, 0) == [255, 0, 0]


def test_shortest_edge_resize_keeps_aspect_and_centre_crops(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    array[:, :10] = (255, 0, 0)  # a red band on the left, cropped away
    Image.fromarray(array).save(tmp_path / "wide.png")
    crop = ImageProcessor(size=10, resize="shortest_edge").load(tmp_path / "wide.png")
    assert crop.shape == (3, 10, 10) and float(crop[0].max()) < -0.5  # no red left
    stretch = ImageProcessor(size=10).load(tmp_path / "wide.png")
    assert float(stretch[0, 5, 0]) > 0.9  # stretched: the red band stays
    with pytest.raises(ValueError, match="resize"):
        ImageProcessor(resize="fit")


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    write_png(tmp_path / "a.png", size=100)
    with pytest.raises(MediaError, match="max_pixels=5,000") as info:
        ImageProcessor(64, max_pixels=5000).load(tmp_path / "a.png")
    assert info.value.reason == "image too large"
    assert ImageProcessor(64, max_pixels=10_000).load(tmp_path / "a.png").shape == (3, 64, 64)


# ------------------------------------------------------------------ image augmentation


AUGMENT = {"random_resized_crop": {"scale": [0.3, 0.6]}, "horizontal_flip": 0.5}


def test_augmentation_only_with_a_seed_and_repeatable(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    plain = ImageProcessor(64)
    aug = ImageProcessor(64, augment=AUGMENT)
    assert aug.augments and not plain.augments
    evaluation = plain.load(tmp_path / "n.png")
    assert torch.equal(aug.load(tmp_path / "n.png"), evaluation), "no seed: no augmentation"
    state = torch.get_rng_state()
    first = aug.load(tmp_path / "n.png", augment_seed=1)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG is left alone"
    assert torch.equal(aug.load(tmp_path / "n.png", augment_seed=1), first)
    assert not torch.equal(aug.load(tmp_path / "n.png", augment_seed=2), first)
    assert not torch.equal(first, evaluation) and first.shape == evaluation.shape
    # the default config has flips off and no crop: a seed changes nothing
    assert torch.equal(plain.load(tmp_path / "n.png", augment_seed=1), evaluation)
    with pytest.raises(ValueError, match="unknown keys"):
        ImageProcessor(augment={"vertical_flip": 0.5})


def test_dataset_augments_training_only_per_epoch_and_pickles(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(record("r", "q?", "a", image="n.png")) + "\n")
    base = processor()
    proc = Processor(base.tokenizer, ImageProcessor(64, augment=AUGMENT), base.audio)
    train = ConversationDataset(tmp_path / "d.jsonl", proc, augment=True, seed=3)
    val = ConversationDataset(tmp_path / "d.jsonl", proc)
    epoch0, again = train[EpochIndex(0, 0)].image, train[EpochIndex(0, 0)].image
    assert torch.equal(epoch0, again), "same (seed, epoch, index): same augmentation"
    assert not torch.equal(train[EpochIndex(0, 1)].image, epoch0), "a new one every epoch"
    assert torch.equal(val[EpochIndex(0, 1)].image, val[0].image), "validation never augments"
    copy = pickle.loads(pickle.dumps(train))
    assert torch.equal(copy[EpochIndex(0, 0)].image, epoch0)
    assert pickle.loads(pickle.dumps(EpochIndex(5, 2))).epoch == 2


# ------------------------------------------------------------------------------- audio


def test_any_rate_and_channels_to_16k_mono(tmp_path):
    for rate in (8000, 22050, 44100, 48000):
        write_wav(tmp_path / f"{rate}.wav", freq=440.0, seconds=1.0, rate=rate, channels=2)
        wave = AudioProcessor(SAMPLE_RATE, normalize=False).load(tmp_path / f"{rate}.wav")
        assert wave.shape == (SAMPLE_RATE,)
        assert int(torch.fft.rfft(wave).abs().argmax()) == 440
    stereo = np.stack([sine(440.0), np.zeros(SAMPLE_RATE, dtype=np.float32)], axis=1)
    sf.write(str(tmp_path / "lr.wav"), stereo, SAMPLE_RATE, subtype="FLOAT")
    wave = AudioProcessor(SAMPLE_RATE, normalize=False).load(tmp_path / "lr.wav")
    assert float(wave.abs().max()) == pytest.approx(0.25, abs=1e-3)  # the mean of L and R
    sf.write(str(tmp_path / "f.flac"), sine(440.0), SAMPLE_RATE)
    assert AudioProcessor(SAMPLE_RATE).load(tmp_path / "f.flac").shape == (SAMPLE_RATE,)


def test_peak_and_rms_normalisation(tmp_path):
    write_wav(tmp_path / "s.wav")  # amplitude 0.5
    peak = AudioProcessor(SAMPLE_RATE, normalize="peak", peak_level=0.9).load(tmp_path / "s.wav")
    assert float(peak.abs().max()) == pytest.approx(0.9, abs=1e-4)
    rms = AudioProcessor(SAMPLE_RATE, normalize="rms", rms_level=0.1).load(tmp_path / "s.wav")
    assert float(rms.pow(2).mean().sqrt()) == pytest.approx(0.1, abs=1e-4)
    raw = AudioProcessor(SAMPLE_RATE, normalize=False).load(tmp_path / "s.wav")
    assert float(raw.abs().max()) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="normalize"):
        AudioProcessor(normalize="loud")


def test_long_audio_crop_random_crop_chunk_and_skip(tmp_path):
    wave = np.arange(3 * SAMPLE_RATE, dtype=np.float32) / (3 * SAMPLE_RATE)  # a ramp, 3 s
    sf.write(str(tmp_path / "long.wav"), wave, SAMPLE_RATE, subtype="FLOAT")
    path = tmp_path / "long.wav"
    crop = AudioProcessor(SAMPLE_RATE, max_seconds=1.0, normalize=False)
    assert torch.equal(crop.load(path), torch.from_numpy(wave[:SAMPLE_RATE]))
    assert crop.chunk_samples == 0 and not crop.augments
    randomly = AudioProcessor(
        SAMPLE_RATE, max_seconds=1.0, normalize=False, augment={"random_crop": True}
    )
    assert torch.equal(randomly.load(path), torch.from_numpy(wave[:SAMPLE_RATE]))
    windows = {float(randomly.load(path, augment_seed=s)[0]) for s in range(5)}
    assert len(windows) > 1 and all(
        randomly.load(path, augment_seed=s).shape == (SAMPLE_RATE,) for s in range(3)
    )
    chunk = AudioProcessor(
        SAMPLE_RATE, max_seconds=1.0, normalize=False, long_audio="chunk", max_chunks=2
    )
    assert chunk.chunk_samples == SAMPLE_RATE
    assert torch.equal(chunk.load(path), torch.from_numpy(wave[: 2 * SAMPLE_RATE]))
    skip = AudioProcessor(SAMPLE_RATE, max_seconds=1.0, long_audio="skip")
    with pytest.raises(MediaError, match="lasts 3.00 s") as info:
        skip.load(path)
    assert info.value.reason == AUDIO_TOO_LONG
    write_wav(tmp_path / "short.wav", seconds=0.5)
    assert skip.load(tmp_path / "short.wav").shape == (SAMPLE_RATE // 2,)


def test_chunked_audio_is_encoded_window_by_window(tmp_path):
    from transformers import Wav2Vec2Config

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=[8, 8],
        conv_kernel=[10, 8],
        conv_stride=[5, 8],
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        apply_spec_augment=False,
    )
    encoder = AudioEncoder(8, config=config).eval()
    chunk = 800
    waves = torch.randn(2, 2000)
    lengths = torch.tensor([2000, 1000])
    with torch.no_grad():
        out = encode_audio_chunks(encoder, waves, lengths, chunk)
        frames = encoder(waves[:1, :chunk], torch.tensor([chunk])).feats.shape[1]
        assert out.feats.shape == (2, 3 * frames, 8)
        for window in range(3):
            alone = encoder(
                waves[:1, window * chunk : (window + 1) * chunk],
                torch.tensor([min(chunk, 2000 - window * chunk)]),
            )
            start = window * frames
            got = out.feats[0, start : start + alone.feats.shape[1]][alone.mask[0]]
            assert torch.allclose(got, alone.feats[0][alone.mask[0]], atol=1e-5)
        # the second clip ends in window 1: window 2 wholly masked
        assert out.mask[1, 2 * frames :].sum() == 0 and out.mask[1, :frames].all()
