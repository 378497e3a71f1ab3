"""Fine-tuning: `init_from` a saved model directory, on transcripts saved by the chat."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import mmfuse.train
from data_modules import world
from mmfuse.chat import ChatSession, run_interactive
from mmfuse.generation import GenerationConfig
from mmfuse.lit_module import MMFuseLitModule
from mmfuse.model_dir import load_model_dir, save_model_dir
from mmfuse.train import train
from tests.conftest import tiny_train_overrides
from tests.helpers import build_tiny, tokenizer


class _FirstStepProbe(MMFuseLitModule):
    """Keeps a copy of the weights the first training step starts from."""

    seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0:
            self.seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    monkeypatch.setattr(mmfuse.train, "MMFuseLitModule", _FirstStepProbe)
    monkeypatch.setattr(_FirstStepProbe, "seen", [])
    return _FirstStepProbe.seen


def _chat_transcript(model_dir: Path, world_dir: Path, transcript: Path) -> None:
    """Two conversations about world media, each saved with /save by the interactive chat."""
    records = [json.loads(line) for line in (world_dir / "train.jsonl").read_text().splitlines()]
    script = ""
    for task in ("both/total", "image/color"):
        record = next(r for r in records if r["task"] == task)
        for part in record["messages"][0]["content"]:
            if part["type"] != "text":
                script += f"/{part['type']} {world_dir / part['path']}\n"
        script += f"What is here?\nAnd now?\n/save {transcript}\n/reset\n"
    model, processor = load_model_dir(model_dir)
    # sampled: the barely trained model's greedy answer may be empty, which is no training data
    generation = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.5, seed=0)
    session = ChatSession(model, processor, generation)
    out = io.StringIO()
    run_interactive(session, io.StringIO(script), out, stream=False)
    text = out.getvalue()
    assert "error:" not in text and text.count("(conversation saved to") == 2, text


def test_finetune_on_chat_transcripts_starts_from_saved_weights(
    trained_run: Path,
    world_dir: Path,
    tmp_path: Path,
    compose_train,
    probe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir = trained_run / "model"
    transcript = tmp_path / "chats" / "transcript.jsonl"
    _chat_transcript(model_dir, world_dir, transcript)
    cfg = compose_train(
        [
            "experiment=chat_finetune",
            f"init_from={model_dir}",
            f"data.train_path={transcript}",
            f"data.val_path={transcript}",
            "data.batch_size=2",
            f"paths.output_dir={tmp_path / 'run'}",
            "trainer.max_steps=2",
            "trainer.enable_model_summary=false",
            "logger=none",
            "callbacks.progress_bar=null",
            "generation.max_new_tokens=4",
        ]
    )

    def no_world_tokenizer():
        raise AssertionError("the tokenizer must come from the model directory")

    monkeypatch.setattr(world, "vocabulary_corpus", no_world_tokenizer)
    metrics = train(cfg)
    assert metrics["train/loss"] > 0 and "val/loss" in metrics

    saved = load_file(model_dir / "model.safetensors")
    (first_step,) = probe
    assert set(saved) <= set(first_step)
    for name, value in saved.items():
        assert torch.equal(first_step[name], value), name
    tuned, tuned_processor = load_model_dir(tmp_path / "run" / "model")
    assert any(not torch.equal(tuned.state_dict()[k], v) for k, v in saved.items()), "trained"
    _, processor = load_model_dir(model_dir)
    assert tuned_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    run_config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert run_config.model.d_model == 32, "the model dir's (tiny) model, not the default"


def test_init_from_a_model_dir_that_does_not_fit_names_it(
    trained_run: Path, world_dir: Path, tmp_path: Path, compose_train
) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained_run / "model", other)
    config = OmegaConf.load(other / "config.yaml")
    config.model.fusion.num_queries = 4  # the saved weights hold 8 queries
    OmegaConf.save(config, other / "config.yaml")
    overrides = tiny_train_overrides(world_dir, tmp_path / "run")
    with pytest.raises(ValueError, match="do not fit") as err:
        train(compose_train([*overrides, f"init_from={other}"]))
    assert str(other) in str(err.value)
    with pytest.raises(FileNotFoundError, match="is not a model directory") as err:
        train(compose_train([*overrides, f"init_from={tmp_path}"]))
    assert str(tmp_path) in str(err.value)


def test_model_finetuned_from_a_pretrained_decoder_stands_alone(
    world_dir: Path, tmp_path: Path, compose_train
) -> None:
    lm_dir = tmp_path / "lm"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer()),
            tie_word_embeddings=True,
        )
    ).save_pretrained(str(lm_dir))
    _, model, cfg = build_tiny(tmp_path / "a", overrides=[f"model.decoder.pretrained={lm_dir}"])
    first = save_model_dir(model, cfg, tmp_path / "a" / "model")
    overrides = tiny_train_overrides(world_dir, tmp_path / "b")
    overrides = [o for o in overrides if not o.startswith(("trainer.max_steps", "+trainer.limit"))]
    cfg = compose_train(
        [*overrides, f"init_from={first}", "trainer.max_steps=1", "+trainer.limit_val_batches=0"]
    )
    train(cfg)
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(lm_dir)
    tuned, _ = load_model_dir(tmp_path / "b" / "model")
    assert (tmp_path / "b" / "model" / "decoder_config" / "config.json").is_file()
    assert tuned.decoder.config.num_hidden_layers == 1  # the pretrained architecture
