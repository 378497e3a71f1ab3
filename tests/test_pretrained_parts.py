"""Pretrained parts from local directories: each kind saved to tmp_path loads back by path and
gives the saved model's outputs; preprocessing and tokenizer follow the directory; model
directories written from them stand on their own (mmfuse.pretrained, hf_vision,
whisper_audio, the timm-directory path of VisionEncoder, AudioEncoder, build_decoder)."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
from helpers import (
    TINY_W2V,
    assert_skipped_without_autograd,
    build_tiny,
    collate,
    mixed_records,
    sine,
)
from omegaconf import OmegaConf
from timm.models import save_for_hf
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    Qwen2Config,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from data_modules import world
from mmfuse.model_dir import CONFIG, load_model_dir, save_model_dir
from mmfuse.modules.encoders import AudioEncoder, VisionEncoder
from mmfuse.modules.hf_vision import HFVisionEncoder
from mmfuse.modules.whisper_audio import WhisperAudioEncoder
from mmfuse.pretrained import audio_settings, image_settings, resolve_processor_config
from mmfuse.processing.text import CHAT_TEMPLATE, build_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 8
MEAN, STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
TINY_VIT = dict(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2)
HF_VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _round_trip(tmp_path, overrides, pretrained_dir, media):
    """Builds the tiny model with ``overrides``, saves a model directory, removes the
    pretrained directory and loads the model back: equal logits. Returns (proc, model)."""
    proc, model, cfg = build_tiny(tmp_path / "run", overrides=overrides)
    batch = collate(proc, mixed_records(), media)
    with torch.no_grad():
        expected = model.eval()(batch)[0]
    out = save_model_dir(model, cfg, tmp_path / "model")
    shutil.rmtree(pretrained_dir)
    loaded, loaded_proc = load_model_dir(out)
    assert loaded_proc.image.size == proc.image.size
    assert loaded_proc.audio.sample_rate == proc.audio.sample_rate
    assert loaded_proc.audio.normalize == proc.audio.normalize
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(collate(loaded_proc, mixed_records(), media))[0], expected
        )
    return proc, model


# ----------------------------------------------------------------------------- vision


def _timm_dir(path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="", **TINY_VIT)
    save_for_hf(vit.eval(), str(path), safe_serialization=True)
    return vit


def test_timm_directory_loads_by_path(tmp_path):
    saved = _timm_dir(tmp_path / "timm")
    encoder = VisionEncoder(D, pretrained=str(tmp_path / "timm")).eval()  # no sizes given
    pixels = _pixels()
    torch.testing.assert_close(
        encoder.backbone.forward_features(pixels), saved.forward_features(pixels)
    )
    assert image_settings(tmp_path / "timm") == {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert image_settings(tmp_path / "none.safetensors") == {}  # a file carries no settings


def test_timm_directory_through_the_config(tmp_path, media):
    _timm_dir(tmp_path / "timm")
    overrides = ["model/vision=timm_dir", f"model.vision.pretrained={tmp_path / 'timm'}"]
    proc, _ = _round_trip(tmp_path, overrides, tmp_path / "timm", media)
    assert proc.image.size == 32  # from the directory's pretrained_cfg, not the world's 64
    saved = OmegaConf.load(tmp_path / "model" / CONFIG).model.vision
    assert saved.model_name == "vit_tiny_patch16_224" and saved.embed_dim == 16
    assert saved.pretrained is None


def test_explicit_timm_image_size_wins_over_the_directory(tmp_path):
    _timm_dir(tmp_path / "timm")
    overrides = [
        "model/vision=timm_dir",
        f"model.vision.pretrained={tmp_path / 'timm'}",
        "+model.vision.img_size=48",  # timm resamples the position embeddings
    ]
    proc, model, _ = build_tiny(tmp_path / "run", overrides=overrides)
    assert proc.image.size == 48
    assert tuple(model.encoders["image"].backbone.patch_embed.img_size) == (48, 48)


def _vit_dir(path):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=16, **HF_VISION), add_pooling_layer=False)
    vit.eval().save_pretrained(str(path))
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    ).save_pretrained(str(path))
    return vit


def test_vit_model_directory_loads_by_path(tmp_path):
    saved = _vit_dir(tmp_path / "vit")
    encoder = HFVisionEncoder(D, pretrained=str(tmp_path / "vit")).eval()
    assert isinstance(encoder.backbone, ViTModel) and encoder.backbone.pooler is None
    assert encoder.image_size == 32
    assert all(p.requires_grad for p in encoder.parameters())  # every parameter is used
    pixels = _pixels()
    out = encoder(pixels, torch.tensor([True, False]))
    expected = encoder.proj(saved(pixel_values=pixels[:1]).last_hidden_state)
    assert out.feats.shape == (2, 1 + 4, D) and out.mask.tolist() == [[True] * 5, [False] * 5]
    torch.testing.assert_close(out.feats[:1], expected)
    assert (out.feats[1] == 0).all()
    assert image_settings(tmp_path / "vit") == {"size": 32, "mean": MEAN, "std": STD}


def test_vision_encoder_without_images_still_reaches_every_parameter(tmp_path):
    _vit_dir(tmp_path / "vit")
    encoder = HFVisionEncoder(D, pretrained=str(tmp_path / "vit"))
    out = encoder(torch.zeros(2, 3, 32, 32), torch.tensor([False, False]))
    assert not out.mask.any()
    (out.feats * out.mask[..., None]).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and (param.grad == 0).all(), name
    assert_skipped_without_autograd(encoder, torch.zeros(2, 3, 32, 32), torch.tensor([0, 0]) > 0)


def test_vit_model_directory_through_the_config(tmp_path, media):
    _vit_dir(tmp_path / "vit")
    overrides = ["model/vision=hf_vit", f"model.vision.pretrained={tmp_path / 'vit'}"]
    proc, _ = _round_trip(tmp_path, overrides, tmp_path / "vit", media)
    assert proc.image.size == 32
    assert proc.image.mean.flatten().tolist() == pytest.approx(MEAN)
    assert proc.image.std.flatten().tolist() == pytest.approx(STD)
    assert (tmp_path / "model" / "vision_config" / "config.json").is_file()


def _clip_config():
    return CLIPVisionConfig(image_size=32, patch_size=16, projection_dim=8, **HF_VISION)


def test_clip_vision_model_directory_loads_by_path(tmp_path):
    torch.manual_seed(0)
    saved = CLIPVisionModel(_clip_config()).eval()
    saved.save_pretrained(str(tmp_path / "clip"))
    CLIPImageProcessor(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(tmp_path / "clip"))
    pixels = _pixels()
    with torch.no_grad():
        reference = saved(pixel_values=pixels, output_hidden_states=True)
    last = HFVisionEncoder(D, pretrained=str(tmp_path / "clip")).eval()
    torch.testing.assert_close(
        last.backbone(pixel_values=pixels).last_hidden_state, reference.last_hidden_state
    )
    # the post-layernorm only feeds the pooled output: frozen, it would get no gradient
    frozen = {n for n, p in last.named_parameters() if not p.requires_grad}
    assert sorted(n.rsplit(".", 2)[-2:] for n in frozen) == [
        ["post_layernorm", "bias"],
        ["post_layernorm", "weight"],
    ]
    penultimate = HFVisionEncoder(D, pretrained=str(tmp_path / "clip"), select_layer=-2).eval()
    penultimate.proj.load_state_dict(last.proj.state_dict())
    out = penultimate(pixels, torch.tensor([True, True]))
    torch.testing.assert_close(out.feats, last.proj(reference.hidden_states[-2]))
    frozen = {n for n, p in penultimate.named_parameters() if not p.requires_grad}
    assert any(".layers.1." in n for n in frozen) and not any(".layers.0." in n for n in frozen)
    settings = image_settings(tmp_path / "clip")
    assert settings["size"] == 32  # the centre crop, not the short side
    assert settings["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_vision_tower_of_a_whole_clip_model(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    clip = CLIPModel(
        CLIPConfig(text_config=text, vision_config=_clip_config().to_dict(), projection_dim=8)
    ).eval()
    clip.save_pretrained(str(tmp_path / "clip"))
    encoder = HFVisionEncoder(D, pretrained=str(tmp_path / "clip")).eval()
    assert isinstance(encoder.backbone, CLIPVisionModel)
    pixels = _pixels()
    torch.testing.assert_close(
        encoder.backbone(pixel_values=pixels).last_hidden_state,
        clip.vision_model(pixel_values=pixels).last_hidden_state,
    )


# ----------------------------------------------------------------------------- audio

W2V = {**TINY_W2V, "layerdrop": 0.1}  # as released checkpoints have it


def _waves() -> tuple[torch.Tensor, torch.Tensor]:
    wave = torch.from_numpy(sine(440.0, 0.5))
    waves = torch.stack([wave, torch.zeros_like(wave)])
    return waves, torch.tensor([wave.numel(), 0])


@pytest.mark.parametrize(
    ("model_cls", "config", "normalize"),
    [
        (
            Wav2Vec2Model,
            Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True, **W2V),
            True,
        ),
        (HubertModel, HubertConfig(feat_extract_norm="group", **W2V), False),
    ],
    ids=["wav2vec2", "hubert"],
)
def test_wav2vec2_family_directory_loads_by_path(tmp_path, model_cls, config, normalize):
    torch.manual_seed(0)
    saved = model_cls(config).eval()
    saved.save_pretrained(str(tmp_path / "audio"))
    Wav2Vec2FeatureExtractor(do_normalize=normalize).save_pretrained(str(tmp_path / "audio"))
    encoder = AudioEncoder(D, pretrained=str(tmp_path / "audio")).eval()
    assert isinstance(encoder.backbone, model_cls)
    assert encoder.backbone.config.layerdrop == 0.0  # no skipped layers (DDP)
    waves, lengths = _waves()
    out = encoder(waves, lengths)
    mask = (torch.arange(waves.shape[1]) < lengths[0]).long()[None]
    with torch.no_grad():
        hidden = saved(waves[:1], attention_mask=mask if normalize else None).last_hidden_state
    torch.testing.assert_close(out.feats[:1], encoder.proj(hidden))
    assert out.mask[0].sum() == hidden.shape[1] and not out.mask[1].any()
    assert audio_settings(tmp_path / "audio") == {"sample_rate": 16000, "normalize": normalize}


def test_hubert_directory_through_the_config(tmp_path, media):
    torch.manual_seed(0)
    HubertModel(HubertConfig(**W2V)).save_pretrained(str(tmp_path / "hubert"))
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(str(tmp_path / "hubert"))
    overrides = ["model/audio=hubert", f"model.audio.pretrained={tmp_path / 'hubert'}"]
    proc, model = _round_trip(tmp_path, overrides, tmp_path / "hubert", media)
    assert isinstance(model.encoders["audio"].backbone, HubertModel)
    assert proc.audio.normalize is False


WHISPER = dict(
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_mel_bins=16,
    max_source_positions=50,  # 100 mel frames: a 1 s window
    max_target_positions=16,
    vocab_size=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)


def _whisper_dir(path):
    torch.manual_seed(0)
    saved = WhisperModel(WhisperConfig(**WHISPER)).eval()
    saved.save_pretrained(str(path))
    extractor = WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    extractor.save_pretrained(str(path))
    return saved, extractor


def test_whisper_encoder_directory_loads_by_path(tmp_path):
    saved, extractor = _whisper_dir(tmp_path / "whisper")
    encoder = WhisperAudioEncoder(D, pretrained=str(tmp_path / "whisper")).eval()
    assert encoder.n_samples == 16000 and encoder.sample_rate == 16000
    waves, lengths = _waves()  # 0.5 s and none
    features = extractor(waves[0].numpy(), sampling_rate=16000, return_tensors="pt")
    features = features.input_features  # (1, 16, 100)
    padded = torch.nn.functional.pad(waves[:1], (0, 16000 - waves.shape[1]))
    torch.testing.assert_close(encoder.log_mel(padded), features, atol=1e-5, rtol=1e-5)
    out = encoder(waves, lengths)
    with torch.no_grad():
        hidden = saved.get_encoder()(features).last_hidden_state  # (1, 50, 16)
    torch.testing.assert_close(out.feats[:1], encoder.proj(hidden), atol=1e-5, rtol=1e-5)
    # 8000 samples: 50 mel frames, 25 encoder frames
    assert out.mask[0].tolist() == [True] * 25 + [False] * 25 and not out.mask[1].any()
    assert (out.feats[1] == 0).all()
    assert audio_settings(tmp_path / "whisper") == {
        "sample_rate": 16000,
        "normalize": False,
        "max_seconds": 1.0,
    }


def test_whisper_encoder_gives_every_parameter_a_gradient_without_audio(tmp_path):
    _whisper_dir(tmp_path / "whisper")
    encoder = WhisperAudioEncoder(D, pretrained=str(tmp_path / "whisper"))
    out = encoder(torch.zeros(2, 800), torch.tensor([0, 0]))
    (out.feats * out.mask[..., None]).sum().backward()
    for name, param in encoder.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
    frozen = [n for n, p in encoder.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.embed_positions.weight"]  # sinusoidal, frozen by Whisper
    assert_skipped_without_autograd(encoder, torch.zeros(2, 800), torch.tensor([0, 0]))


def test_whisper_directory_through_the_config(tmp_path, media):
    _whisper_dir(tmp_path / "whisper")
    overrides = ["model/audio=whisper", f"model.audio.pretrained={tmp_path / 'whisper'}"]
    proc, model = _round_trip(tmp_path, overrides, tmp_path / "whisper", media)
    assert proc.audio.normalize is False and proc.audio.max_samples == 16000
    assert (tmp_path / "model" / "audio_config" / "preprocessor_config.json").is_file()


# ----------------------------------------------------------------------------- decoder

TEMPLATE = CHAT_TEMPLATE.replace("{{ message.role + '\\n' }}", "{{ message.role + ':\\n' }}")


def _lm_config(kind: str, vocab: int):
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128, vocab_size=vocab)
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        vocab_size=vocab,
    )
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=2, **sizes)
    return Qwen2Config(num_key_value_heads=1, **sizes)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_causal_lm_with_its_tokenizer_loads_by_path(tmp_path, media, kind):
    tokenizer = build_bpe_tokenizer(world.vocabulary_corpus(), vocab_size=320)
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(_lm_config(kind, len(tokenizer))).eval()
    lm_dir = tmp_path / "lm"
    saved.save_pretrained(str(lm_dir))
    tokenizer.save_pretrained(str(lm_dir))
    overrides = ["model/decoder=pretrained", f"model.decoder.pretrained={lm_dir}"]
    proc, model, cfg = build_tiny(tmp_path / "run", overrides=overrides)
    # the directory's tokenizer and chat template, not the world's
    assert proc.tokenizer.get_vocab() == tokenizer.get_vocab() and len(proc.tokenizer) < 512
    assert proc.tokenizer.chat_template == TEMPLATE and model.tokenizer is proc.tokenizer
    batch = collate(proc, mixed_records(), media)
    assert "assistant:\n" in proc.tokenizer.decode(batch.input_ids[0])
    with torch.no_grad():
        ids = batch.input_ids[:, :12]
        torch.testing.assert_close(model.decoder(ids).logits, saved(ids).logits)
        expected = model.eval()(batch)[0]
    out = save_model_dir(model, cfg, tmp_path / "model")
    shutil.rmtree(lm_dir)
    loaded, loaded_proc = load_model_dir(out)
    assert loaded_proc.tokenizer.chat_template == TEMPLATE
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)[0], expected)


def test_resolve_leaves_a_config_without_pretrained_parts_alone(tmp_path):
    _, _, cfg = build_tiny(tmp_path)
    assert resolve_processor_config(cfg) is cfg


def test_no_settings_without_preprocessing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    assert image_settings(tmp_path / "empty") == {} and audio_settings(tmp_path / "empty") == {}
