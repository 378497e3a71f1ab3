"""Tests of the fusion variants: fusion_perceiver, fusion_qformer, fusion_concat."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mmfuse.loss import next_token_loss
from mmfuse.model_dir import load_model_dir
from mmfuse.modules.fusion import CrossAttentionFusion
from mmfuse.modules.fusion_concat import ConcatFusion
from mmfuse.modules.fusion_perceiver import PerceiverFusion
from mmfuse.modules.fusion_qformer import QFormerFusion
from mmfuse.types import Memory, ModalityTokens
from tests.conftest import tiny_train_overrides
from tests.helpers import build_tiny, collate, mixed_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, L, Q = 16, 3, 4  # width, perceiver latents per modality, Q-Former queries
N_IMAGE, N_AUDIO, P = 5, 6, 3
# rows: image only, audio only, image + audio, no media
HAS_IMAGE = [True, False, True, False]
AUDIO_LENGTHS = [0, 4, 6, 0]
PROMPT_LENGTHS = [3, 2, 1, 2]

# builders of (modalities, prompt mode); concat has one way to read a prompt
BUILDERS: dict[str, Callable[[list[str], str], nn.Module]] = {
    "perceiver": lambda mods, mode: PerceiverFusion(
        mods, D, num_queries=L, num_layers=2, num_heads=2, mlp_ratio=2.0, prompt=mode
    ),
    "qformer": lambda mods, mode: QFormerFusion(
        mods, D, num_queries=Q, num_layers=2, num_heads=2, mlp_ratio=2.0, prompt=mode
    ),
    "concat": lambda mods, mode: ConcatFusion(mods, D, mlp_ratio=2.0),
}
DEFAULT_MODE = {"perceiver": "memory", "qformer": "attend", "concat": "add"}
# (variant, prompt mode or False: no prompt encoder, True: the variant's default mode)
CASES = [("perceiver", False), ("perceiver", True), ("perceiver", "add"), ("perceiver", "both")]
CASES += [("qformer", False), ("qformer", True), ("qformer", "add"), ("qformer", "both")]
CASES += [("concat", False), ("concat", True)]


def _build(variant: str, prompt: bool | str) -> nn.Module:
    torch.manual_seed(0)
    mode = prompt if isinstance(prompt, str) else DEFAULT_MODE[variant]
    mods = ["audio", "image", "text"] if prompt else ["image", "audio"]
    return BUILDERS[variant](mods, mode).eval()


def _tokens(prompt: bool | str = False, seed: int = 1) -> dict[str, ModalityTokens]:
    """A batch of 4 records: image only, audio only, both, none (audio partly padded)."""
    torch.manual_seed(seed)
    image_mask = torch.tensor(HAS_IMAGE)[:, None].expand(-1, N_IMAGE)
    audio_mask = torch.arange(N_AUDIO)[None, :] < torch.tensor(AUDIO_LENGTHS)[:, None]
    tokens = {
        "image": ModalityTokens(torch.randn(4, N_IMAGE, D), image_mask),
        "audio": ModalityTokens(torch.randn(4, N_AUDIO, D), audio_mask),
    }
    if prompt:
        prompt_mask = torch.arange(P)[None, :] < torch.tensor(PROMPT_LENGTHS)[:, None]
        tokens["text"] = ModalityTokens(torch.randn(4, P, D), prompt_mask)
    return tokens


def _expected_mask(
    variant: str, tokens: dict[str, ModalityTokens], prompt: bool | str
) -> torch.Tensor:
    null = torch.ones(4, 1, dtype=torch.bool)
    if variant == "qformer":
        return torch.ones(4, Q, dtype=torch.bool)
    if variant == "concat":
        return torch.cat([null, tokens["image"].mask, tokens["audio"].mask], dim=1)
    parts = [null] + [tokens[m].mask.any(1, keepdim=True).expand(-1, L) for m in ("image", "audio")]
    if "text" in tokens and prompt != "add":  # the prompt tokens are appended
        parts.append(tokens["text"].mask)
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize(("variant", "prompt"), CASES)
def test_memory_shape_and_mask(variant: str, prompt: bool | str) -> None:
    tokens = _tokens(prompt)
    memory = _build(variant, prompt)(tokens)
    assert isinstance(memory, Memory)
    expected = _expected_mask(variant, tokens, prompt)
    assert memory.mask.dtype == torch.bool and torch.equal(memory.mask, expected)
    assert memory.feats.shape == (*expected.shape, D)
    assert torch.isfinite(memory.feats).all()
    assert memory.mask.any(dim=1).all(), "every row keeps one valid position"
    valid = memory.feats * memory.mask[..., None]
    for i in range(4):  # the rows have different media, so their memories differ
        for j in range(i):
            assert not torch.allclose(valid[i], valid[j], atol=1e-4), (i, j)


@pytest.mark.parametrize(("variant", "prompt"), CASES)
def test_masked_tokens_do_not_change_the_memory(variant: str, prompt: bool | str) -> None:
    fusion = _build(variant, prompt)
    tokens = _tokens(prompt)
    expected = fusion(tokens)
    changed = {}
    for name, tok in tokens.items():
        feats = tok.feats.clone()
        feats[~tok.mask] = torch.randn(int((~tok.mask).sum()), D) * 50
        changed[name] = ModalityTokens(feats, tok.mask)
    out = fusion(changed)
    torch.testing.assert_close(out.feats, expected.feats)
    assert torch.equal(out.mask, expected.mask)
    # a real token does change the memory, of its own row only
    feats = tokens["audio"].feats.clone()
    feats[2, 0] += torch.randn(D)
    out = fusion({**tokens, "audio": ModalityTokens(feats, tokens["audio"].mask)}).feats
    assert not torch.allclose(out[2], expected.feats[2], atol=1e-4)
    torch.testing.assert_close(out[[0, 1, 3]], expected.feats[[0, 1, 3]])


@pytest.mark.parametrize(("variant", "prompt"), CASES)
def test_every_parameter_gets_a_gradient(variant: str, prompt: bool | str) -> None:
    fusion = _build(variant, prompt).train()
    memory = fusion(_tokens(prompt))
    (memory.feats * memory.mask[..., None]).square().sum().backward()  # valid positions only
    for name, param in fusion.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("variant", ["perceiver", "qformer", "concat"])
def test_batch_without_any_media(variant: str) -> None:
    fusion = _build(variant, False)
    tokens = {k: ModalityTokens(v.feats, torch.zeros_like(v.mask)) for k, v in _tokens().items()}
    memory = fusion(tokens)
    assert torch.isfinite(memory.feats).all()
    assert memory.mask[:, 0].all() and (variant == "qformer" or not memory.mask[:, 1:].any())
    torch.testing.assert_close(memory.feats[0], memory.feats[1])  # nothing tells them apart


@pytest.mark.parametrize("variant", ["perceiver", "qformer", "concat"])
def test_wrong_modalities_raise(variant: str) -> None:
    fusion = _build(variant, False)
    tokens = _tokens()
    with pytest.raises(ValueError, match="fusion expects"):
        fusion({"image": tokens["image"]})
    with pytest.raises(ValueError, match="fusion expects"):
        fusion({**tokens, "text": tokens["image"]})


def test_perceiver_appends_the_prompt_after_the_latents() -> None:
    tokens = _tokens(prompt=True)
    memory = _build("perceiver", True)(tokens)
    prompt = tokens["text"].feats * tokens["text"].mask[..., None]  # padding: zero
    torch.testing.assert_close(memory.feats[:, -P:], prompt)
    without = _build("perceiver", False)({k: tokens[k] for k in ("image", "audio")})
    torch.testing.assert_close(memory.feats[:, :-P], without.feats)  # resampling ignores it


@pytest.mark.parametrize(("variant", "mode"), [case for case in CASES if case[1]])
def test_the_prompt_conditions_the_memory(variant: str, mode: bool | str) -> None:
    fusion = _build(variant, mode)
    mode = mode if isinstance(mode, str) else DEFAULT_MODE[variant]
    tokens, other = _tokens(mode, seed=1), _tokens(mode, seed=1)
    other["text"] = _tokens(mode, seed=2)["text"]
    first, second = fusion(tokens), fusion(other)
    media = first.mask.clone()
    if variant == "perceiver" and mode != "add":
        media[:, -P:] = False  # the appended prompt tokens differ anyway
    # the memory read from the media depends on the question, except where a mode keeps
    # the resampling prompt-agnostic (Flamingo's perceiver)
    changed = not torch.allclose(first.feats[media], second.feats[media], atol=1e-4)
    assert changed == (variant != "perceiver" or mode != "memory")


def test_queries_that_start_from_the_prompt_sum() -> None:
    """``add``: every query (latent) starts from the summed prompt tokens. The Q-Former
    then is ``CrossAttentionFusion`` with ``prompt="add"`` (no prompt MLPs), and the
    perceiver's latents are those of a prompt-agnostic perceiver whose queries were moved
    by the sum."""
    qformer = _build("qformer", "add")
    assert all(block.prompt_mlp is None for block in qformer.blocks)
    cross = CrossAttentionFusion(["audio", "image", "text"], D, Q, 2, 2, 2.0, prompt="add")
    cross.load_state_dict(qformer.state_dict())
    tokens = _tokens("add")
    torch.testing.assert_close(qformer(tokens).feats, cross.eval()(tokens).feats)
    perceiver = _build("perceiver", "add")
    memory = perceiver(tokens)
    total = (tokens["text"].feats * tokens["text"].mask[..., None]).sum(1, keepdim=True)
    resampler = perceiver.resamplers["image"]
    expected = resampler(tokens["image"].feats, tokens["image"].mask, total)
    torch.testing.assert_close(memory.feats[[0, 2], 1 : 1 + L], expected[[0, 2]])  # with image
    with pytest.raises(ValueError, match="is not one of"):
        PerceiverFusion(["image", "text"], D, prompt="attend")
    with pytest.raises(ValueError, match="is not one of"):
        QFormerFusion(["image", "text"], D, prompt="memory")


def test_qformer_updates_the_prompt_unlike_cross_attention() -> None:
    qformer = _build("qformer", True)
    assert qformer.blocks[0].prompt_mlp is not None and qformer.blocks[-1].prompt_mlp is None
    cross = CrossAttentionFusion(["audio", "image", "text"], D, Q, 2, 2, 2.0).eval()
    state = {k: v for k, v in qformer.state_dict().items() if "prompt_mlp" not in k}
    cross.load_state_dict(state)  # the same weights, bar the prompt MLP
    tokens = _tokens(prompt=True)
    # the joint self-attention rewrites the prompt that the next block's queries read
    assert not torch.allclose(qformer(tokens).feats, cross(tokens).feats, atol=1e-4)
    # without a prompt the two are the same architecture
    qformer, cross = (
        _build("qformer", False),
        CrossAttentionFusion(["image", "audio"], D, Q, 2, 2, 2.0),
    )
    cross.load_state_dict(qformer.state_dict())
    media = _tokens()
    torch.testing.assert_close(qformer(media).feats, cross.eval()(media).feats)
    # the prompt conditions the memory
    first = _build("qformer", True)(_tokens(True, seed=1))
    other = _tokens(True, seed=1)
    other["text"] = _tokens(True, seed=2)["text"]
    assert not torch.allclose(first.feats, _build("qformer", True)(other).feats, atol=1e-4)


def test_concat_order_and_projection() -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion(["audio", "image"], D).eval()  # fixed order, whatever is given
    tokens = _tokens()
    memory = fusion(tokens)
    image = fusion.projectors["image"](tokens["image"].feats) * tokens["image"].mask[..., None]
    torch.testing.assert_close(memory.feats[:, 1 : 1 + N_IMAGE], image)
    torch.testing.assert_close(memory.feats[:, 0], fusion.null_token.expand(4, -1))
    assert (memory.feats[~memory.mask] == 0).all()
    assert [type(m).__name__ for m in fusion.projectors["audio"]] == [
        "Linear",
        "GELU",
        "Dropout",
        "Linear",
    ]


def test_concat_projects_each_token_with_the_summed_prompt() -> None:
    """With a prompt encoder each media token is projected together with the question; the
    prompt tokens themselves are not in the memory."""
    torch.manual_seed(0)
    fusion = ConcatFusion(["image", "audio", "text"], D).eval()
    tokens = _tokens(prompt=True)
    memory = fusion(tokens)
    text = tokens["text"]
    total = (text.feats * text.mask[..., None]).sum(1, keepdim=True)  # (B, 1, D)
    audio = tokens["audio"]
    expected = fusion.projectors["audio"](audio.feats + total) * audio.mask[..., None]
    torch.testing.assert_close(memory.feats[:, 1 + N_IMAGE :], expected)
    assert memory.feats.shape[1] == 1 + N_IMAGE + N_AUDIO


def test_cross_attention_state_dict_keys_are_unchanged() -> None:
    """The shared helpers left CrossAttentionFusion's keys as they were: saved models load."""
    fusion = CrossAttentionFusion(["image", "audio", "text"], D, num_queries=2, num_layers=1)
    attn = [f"{layer}.{p}" for layer in ("to_q", "to_kv", "to_out") for p in ("weight", "bias")]
    norm, mlp = ["weight", "bias"], ["0.weight", "0.bias", "3.weight", "3.bias"]
    parts = {"norm_q": norm, "norm_ctx": norm, "cross": attn, "norm_self": norm}
    parts |= {"self_attn": attn, "norm_mlp": norm, "mlp": mlp}
    block = {f"blocks.0.{part}.{p}" for part, names in parts.items() for p in names}
    type_embed = {f"type_embed.{m}" for m in ("image", "audio", "text")}
    assert set(fusion.state_dict()) == {
        "queries",
        "null_token",
        "norm.weight",
        "norm.bias",
        *type_embed,
        *block,
    }


# ----------------------------------------------------------------------------- whole model


@pytest.mark.parametrize(
    "overrides",
    [
        ["model/fusion=perceiver", "model/text=bert_tiny"],
        ["model/fusion=qformer", "model/text=bert_tiny", "model.fusion.num_layers=2"],
        ["model/fusion=concat"],
        ["model/fusion=concat", "model/text=bag_of_words"],
        ["model/fusion=perceiver", "model/text=bag_of_words", "model.fusion.prompt=add"],
    ],
    ids=["perceiver+text", "qformer+text", "concat", "concat+words", "perceiver+words-added"],
)
def test_model_trains_every_parameter(overrides: list[str], media: Path, tmp_path: Path) -> None:
    """Every parameter of the tiny model gets a gradient, in a batch with all kinds of records
    and in one without any image (DDP runs without an unused-parameter search)."""
    proc, model, _ = build_tiny(tmp_path, overrides=overrides)
    records = mixed_records()  # text only, image only, audio only, image + audio
    for batch_records in (records, [records[0], records[2]]):
        model.zero_grad()
        batch = collate(proc, batch_records, media)
        loss, _ = next_token_loss(*model(batch))
        assert torch.isfinite(loss)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing


def test_train_cli_with_each_fusion(world_dir: Path, tmp_path: Path) -> None:
    """`mmfuse-train model=tiny trainer.max_steps=2 model/fusion=<each>` exits 0, run as one
    multirun (one process start for the three runs); the 2-step epoch ends with validation
    (loss and generation), and each saved model directory loads back."""
    dropped = ("paths.output_dir", "trainer.max_steps", "+trainer.limit_")
    overrides = [o for o in tiny_train_overrides(world_dir, tmp_path) if not o.startswith(dropped)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "mmfuse-train"),
            "--multirun",
            *overrides,
            "trainer.max_steps=2",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "model/fusion=perceiver,qformer,concat",
            f"hydra.sweep.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, fusion in enumerate((PerceiverFusion, QFormerFusion, ConcatFusion)):
        metrics = (tmp_path / str(job) / "csv" / "metrics.csv").read_text()
        assert "val/loss" in metrics.splitlines()[0], job
        model, _ = load_model_dir(tmp_path / str(job) / "model")
        assert isinstance(model.fusion, fusion)
