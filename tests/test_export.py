"""Tests of mmfuse.export: the Hugging Face layout, and the round trip back to MMFuseModel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_tiny, collate, mixed_records
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmfuse.export import DECODER, WEIGHTS, export, load_export
from mmfuse.lora import apply_lora, merge_lora
from mmfuse.model_dir import save_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, media):
    """A model directory of the tiny model (with a prompt encoder and a pretrained audio
    encoder) whose decoder was tuned with LoRA and merged, as a training run writes it; its
    processor, the mixed batch, the model's logits on it and the decoder's on its ids."""
    base = tmp_path_factory.mktemp("export")
    _, model, _ = build_tiny(base / "run", seed=1)
    model.encoders["audio"].backbone.save_pretrained(str(base / "w2v"))  # a pretrained part
    overrides = ["model/text=bert_tiny", f"model.audio.pretrained={base / 'w2v'}"]
    proc, model, cfg = build_tiny(base / "run", overrides=overrides)
    apply_lora(model, {"r": 4, "components": {"decoder": True}})
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # as training would move them
    merge_lora(model)
    batch = collate(proc, mixed_records(), media)
    with torch.no_grad():
        logits = model.eval()(batch)[0]
        lm_logits = model.decoder(batch.input_ids).logits
    out = save_model_dir(model, cfg, base / "model")
    shutil.rmtree(base / "w2v")
    return out, proc, batch, logits, lm_logits


def test_decoder_loads_alone_with_transformers(model_dir, tmp_path):
    path, proc, batch, _, lm_logits = model_dir
    out = export(path, tmp_path / "export")
    decoder = AutoModelForCausalLM.from_pretrained(str(out / DECODER)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / DECODER))
    assert tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert tokenizer.chat_template == proc.tokenizer.chat_template
    messages = mixed_records()[0]["messages"]
    assert tokenizer.apply_chat_template(messages) == proc.tokenizer.apply_chat_template(messages)
    with torch.no_grad():
        torch.testing.assert_close(decoder(batch.input_ids).logits, lm_logits)
    weights = load_file(str(out / WEIGHTS))
    assert weights and not any(n.startswith("decoder.") for n in weights)
    assert {n.split(".")[0] for n in weights} == {"encoders", "fusion", "conditioning"}
    assert (out / "audio_config" / "config.json").is_file()


def test_round_trip_gives_equal_logits(model_dir, tmp_path):
    path, _, batch, logits, _ = model_dir
    out = export(path, tmp_path / "export")
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))  # stands on its own, wherever it is
    model, proc = load_export(moved)
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], logits)
    assert proc.tokenizer.chat_template == model.tokenizer.chat_template


def test_missing_weights_are_named(model_dir, tmp_path):
    out = export(model_dir[0], tmp_path / "export")
    weights = load_file(str(out / WEIGHTS))
    weights.pop("fusion.queries")
    save_file(weights, str(out / WEIGHTS))
    with pytest.raises(ValueError, match=r"missing \['fusion.queries'\]"):
        load_export(out)


def test_console_script(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = Path(sys.executable).parent / "mmfuse-export"
    result = subprocess.run(
        [str(script), f"ckpt={model_dir[0]}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / DECODER / "config.json").is_file()
    assert (tmp_path / "out" / WEIGHTS).is_file()
    assert not (tmp_path / "outputs").exists()  # no Hydra run directory
