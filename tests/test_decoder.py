"""Tests of mmfuse.modules.decoder.build_decoder."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_cfg, tokenizer
from hydra.utils import instantiate
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from mmfuse.modules.decoder import build_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )


def test_build_from_config_sets_vocab_and_special_ids():
    tok = tokenizer()
    torch.manual_seed(0)
    model = build_decoder(tok, config=_llama_config(vocab_size=32000))
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.get_output_embeddings().out_features == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.bos_token_id is None
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, len(tok))


def test_needs_config_or_pretrained():
    with pytest.raises(ValueError, match="config or a pretrained"):
        build_decoder(tokenizer())


def test_pretrained_directory_round_trip(tmp_path):
    tok = tokenizer()
    torch.manual_seed(0)
    saved = LlamaForCausalLM(_llama_config(vocab_size=len(tok))).eval()
    saved.save_pretrained(str(tmp_path / "lm"))
    loaded = build_decoder(tok, pretrained=str(tmp_path / "lm")).eval()
    assert isinstance(loaded, LlamaForCausalLM)
    torch.manual_seed(1)
    ids = torch.randint(0, len(tok), (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, saved(input_ids=ids).logits)


def test_pretrained_with_smaller_vocab_is_resized(tmp_path):
    tok = tokenizer()
    torch.manual_seed(0)
    saved = LlamaForCausalLM(_llama_config(vocab_size=300)).eval()
    saved.save_pretrained(str(tmp_path / "lm"))
    loaded = build_decoder(tok, pretrained=str(tmp_path / "lm")).eval()
    assert loaded.get_input_embeddings().num_embeddings == len(tok)
    assert loaded.config.vocab_size == len(tok)
    # the old rows are kept
    torch.testing.assert_close(
        loaded.get_input_embeddings().weight[:300], saved.get_input_embeddings().weight
    )


def test_gpt2_config_builds():
    tok = tokenizer()
    torch.manual_seed(0)
    model = build_decoder(tok, config=GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert model(input_ids=torch.tensor([[5, 6]])).logits.shape == (1, 2, len(tok))


@pytest.mark.parametrize("name", ["llama_tiny", "gpt2_tiny"])
def test_decoder_configs_instantiate(tmp_path, name):
    cfg = compose_cfg(tmp_path, [f"model/decoder={name}"])
    tok = tokenizer()
    torch.manual_seed(0)
    model = instantiate(cfg.model.decoder, _convert_="all")(tokenizer=tok)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)
    assert model.config.model_type == name.split("_")[0]
