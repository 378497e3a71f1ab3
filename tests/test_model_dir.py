"""Tests of mmfuse.model_dir: save, load, self-contained configs, compatibility checks."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import build_tiny, collate, mixed_records, tokenizer
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from data_modules import world
from mmfuse.model_dir import CONFIG, TOKENIZER, WEIGHTS, load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def forbid_world_corpus(monkeypatch):
    """Call it before loading: from then on the world's corpus cannot be used (a model
    directory must load its own tokenizer, not train one)."""

    def fail():
        raise AssertionError("vocabulary_corpus() called while loading a model directory")

    return lambda: monkeypatch.setattr(world, "vocabulary_corpus", fail)


def _logits(model, proc, media):
    batch = collate(proc, mixed_records(), media)
    with torch.no_grad():
        return model.eval()(batch)[0]


def _perturb(model, seed=5):
    """Moves every weight away from its initial value, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)


def _tiny_llama_dir(path, vocab_size):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def test_round_trip_gives_equal_logits(tmp_path, media, forbid_world_corpus):
    proc, model, cfg = build_tiny(tmp_path / "run")
    _perturb(model)
    expected = _logits(model, proc, media)
    out = save_model_dir(model, cfg, tmp_path / "model")
    assert out == tmp_path / "model"
    for name in (WEIGHTS, CONFIG, f"{TOKENIZER}/tokenizer.json"):
        assert (out / name).is_file(), name
    forbid_world_corpus()
    loaded, loaded_proc = load_model_dir(out)
    assert not loaded.training
    assert loaded_proc.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert loaded.tokenizer is loaded_proc.tokenizer
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)
    # every weight came back, the tied output embedding included
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_saved_config_refers_to_the_directory_tokenizer(tmp_path):
    proc, model, cfg = build_tiny(tmp_path / "run")
    out = save_model_dir(model, cfg, tmp_path / "model")
    text = (out / CONFIG).read_text()
    assert "vocabulary_corpus" not in text and "build_bpe_tokenizer" not in text
    saved = OmegaConf.load(out / CONFIG)
    assert saved.processor.tokenizer._target_ == "mmfuse.processing.text.load_tokenizer"
    assert OmegaConf.to_container(saved.processor.tokenizer)["path"] == "${model_dir}/tokenizer"
    assert saved.model.d_model == 32  # interpolations are resolved
    assert saved.processor.image.size == 64
    assert "paths" not in saved and "trainer" not in saved


def test_model_directory_can_be_moved(tmp_path, media, forbid_world_corpus):
    proc, model, cfg = build_tiny(tmp_path / "run")
    _perturb(model)
    expected = _logits(model, proc, media)
    save_model_dir(model, cfg, tmp_path / "model")
    shutil.move(str(tmp_path / "model"), str(tmp_path / "moved"))
    forbid_world_corpus()
    loaded, loaded_proc = load_model_dir(tmp_path / "moved")
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)


def test_pretrained_decoder_is_not_needed_after_saving(tmp_path, media, forbid_world_corpus):
    lm_dir = _tiny_llama_dir(tmp_path / "lm", vocab_size=len(tokenizer()))
    proc, model, cfg = build_tiny(
        tmp_path / "run", overrides=[f"model.decoder.pretrained={lm_dir}"]
    )
    _perturb(model)
    expected = _logits(model, proc, media)
    out = save_model_dir(model, cfg, tmp_path / "model")
    assert (out / "decoder_config" / "config.json").is_file()
    saved = OmegaConf.load(out / CONFIG)
    assert saved.model.decoder.pretrained is None
    assert saved.model.decoder.config._target_ == "transformers.AutoConfig.from_pretrained"
    shutil.rmtree(lm_dir)
    forbid_world_corpus()
    loaded, loaded_proc = load_model_dir(out)
    assert loaded.decoder.config.num_hidden_layers == 1  # the pretrained architecture
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)


def test_pretrained_decoder_with_larger_vocabulary_reloads(tmp_path, media, forbid_world_corpus):
    lm_dir = _tiny_llama_dir(tmp_path / "lm", vocab_size=512)
    assert len(tokenizer()) < 512
    proc, model, cfg = build_tiny(
        tmp_path / "run", overrides=[f"model.decoder.pretrained={lm_dir}"]
    )
    assert model.decoder.get_input_embeddings().num_embeddings == 512
    expected = _logits(model, proc, media)
    out = save_model_dir(model, cfg, tmp_path / "model")
    shutil.rmtree(lm_dir)
    forbid_world_corpus()
    loaded, loaded_proc = load_model_dir(out)
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)


def test_pretrained_audio_encoder_is_not_needed_after_saving(tmp_path, media):
    proc, model, cfg = build_tiny(tmp_path / "run")
    model.encoders["audio"].backbone.save_pretrained(str(tmp_path / "w2v"))
    proc, model, cfg = build_tiny(
        tmp_path / "run", seed=1, overrides=[f"model.audio.pretrained={tmp_path / 'w2v'}"]
    )
    expected = _logits(model, proc, media)
    out = save_model_dir(model, cfg, tmp_path / "model")
    assert (out / "audio_config" / "config.json").is_file()
    shutil.rmtree(tmp_path / "w2v")
    loaded, loaded_proc = load_model_dir(out)
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)


def _bert_dir(path, vocab_size):
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    ).save_pretrained(str(path))
    return path


def test_pretrained_text_encoder_is_not_needed_after_saving(tmp_path, media):
    bert = _bert_dir(tmp_path / "bert", vocab_size=len(tokenizer()))
    overrides = ["model/text=bert_tiny", f"model.text.pretrained={bert}"]
    proc, model, cfg = build_tiny(tmp_path / "run", overrides=overrides)
    assert set(model.encoders) == {"image", "audio", "text"}
    expected = _logits(model, proc, media)
    out = save_model_dir(model, cfg, tmp_path / "model")
    shutil.rmtree(bert)
    loaded, loaded_proc = load_model_dir(out)
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)


def test_pretrained_text_encoder_with_larger_vocabulary_reloads(tmp_path, media):
    bert = _bert_dir(tmp_path / "bert", vocab_size=512)
    overrides = ["model/text=bert_tiny", f"model.text.pretrained={bert}"]
    proc, model, cfg = build_tiny(tmp_path / "run", overrides=overrides)
    expected = _logits(model, proc, media)
    out = save_model_dir(model, cfg, tmp_path / "model")
    shutil.rmtree(bert)
    loaded, loaded_proc = load_model_dir(out)
    torch.testing.assert_close(_logits(loaded, loaded_proc, media), expected)


def test_directory_without_config_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_model_dir(tmp_path / "empty")


def test_directory_without_weights_raises(tmp_path):
    proc, model, cfg = build_tiny(tmp_path / "run")
    out = save_model_dir(model, cfg, tmp_path / "model")
    (out / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_model_dir(out)


def test_processor_and_vision_sizes_must_agree(tmp_path):
    with pytest.raises(ValueError, match="processor.image.size=32"):
        build_tiny(tmp_path, overrides=["processor.image.size=32"])
