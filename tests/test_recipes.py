"""Staged recipes (``mmfuse-recipe``): stage 1 aligns on captions with frozen encoder
backbones and decoder, stage 2 instruction-tunes from stage 1's model; and the task filter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmfuse.train
from data_modules.conversation import ConversationDataset
from data_modules.task_filter import select_tasks
from mmfuse.lit_module import MMFuseLitModule
from mmfuse.model_dir import load_model_dir
from mmfuse.recipes import load_recipe, run_recipe, split_arguments
from tests.conftest import tiny_train_overrides
from tests.helpers import processor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Probe(MMFuseLitModule):
    """Keeps the weights each fit starts from and the tasks of every training batch."""

    starts: list[dict[str, torch.Tensor]] = []
    tasks: list[tuple[int, list[str]]] = []

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0:
            self.starts.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.tasks.append((len(self.starts) - 1, list(batch.tasks)))


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> type[_Probe]:
    monkeypatch.setattr(mmfuse.train, "MMFuseLitModule", _Probe)
    monkeypatch.setattr(_Probe, "starts", [])
    monkeypatch.setattr(_Probe, "tasks", [])
    return _Probe


def _frozen_in_stage1(name: str) -> bool:
    return name.startswith("decoder.") or (name.startswith("encoders.") and ".backbone." in name)


def test_two_stage_recipe(world_dir: Path, tmp_path: Path, probe: type[_Probe]) -> None:
    dropped = ("paths.output_dir", "trainer.max_steps")
    common = [o for o in tiny_train_overrides(world_dir, tmp_path) if not o.startswith(dropped)]
    out = tmp_path / "recipe"
    overrides = [*common, "stage1.trainer.max_steps=2", "stage2.trainer.max_steps=2"]
    models = run_recipe("two_stage", out, overrides)
    assert models == {"stage1": out / "stage1" / "model", "stage2": out / "stage2" / "model"}
    assert (out / "recipe.yaml").is_file()
    stage1_start, stage2_start = probe.starts

    # stage 1: captions only; encoder backbones and decoder unchanged, the rest trained
    stage1_tasks = [t for stage, tasks in probe.tasks if stage == 0 for t in tasks]
    assert stage1_tasks and all(t.endswith("/caption") for t in stage1_tasks), stage1_tasks
    stage1, _ = load_model_dir(models["stage1"])
    after1 = stage1.state_dict()
    frozen = [k for k in after1 if _frozen_in_stage1(k)]
    assert frozen and all(torch.equal(after1[k], stage1_start[k]) for k in frozen)
    for part in ("fusion.", "conditioning.", "encoders.image.proj."):
        changed = [k for k in after1 if k.startswith(part)]
        assert any(not torch.equal(after1[k], stage1_start[k]) for k in changed), part

    # stage 2 starts from stage 1's weights, on every task; the decoder trains now
    assert stage2_start.keys() == after1.keys()
    for key, value in after1.items():
        assert torch.equal(stage2_start[key], value), key
    stage2_tasks = {t for stage, tasks in probe.tasks if stage == 1 for t in tasks}
    assert any(not t.endswith("/caption") for t in stage2_tasks), stage2_tasks
    after2 = load_model_dir(models["stage2"])[0].state_dict()
    decoder = [k for k in after2 if k.startswith("decoder.")]
    assert any(not torch.equal(after2[k], after1[k]) for k in decoder)
    backbones = [k for k in after2 if k.startswith("encoders.") and ".backbone." in k]
    assert all(torch.equal(after2[k], after1[k]) for k in backbones)

    # the same command again: both stages are done, nothing trains
    run_recipe("two_stage", out, overrides)
    assert len(probe.starts) == 2


def test_arguments_split_by_stage() -> None:
    names = [s.name for s in load_recipe("two_stage")]
    assert names == ["stage1", "stage2"]
    own, common, per_stage = split_arguments(
        [
            "model=tiny",
            "stage1.trainer.max_steps=5",
            "+stage2.trainer.limit_val_batches=0",
            "stage2.lora=decoder",
            "model.fusion.num_queries=4",
            "output_dir=x",
        ],
        names,
    )
    assert own == {"output_dir": "x"}
    assert common == ["model=tiny", "model.fusion.num_queries=4"]
    assert per_stage == {
        "stage1": ["trainer.max_steps=5"],
        "stage2": ["+trainer.limit_val_batches=0", "lora=decoder"],
    }


def test_bad_recipe_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such recipe"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  a: {init_from: b}\n  b: {}\n")
    with pytest.raises(ValueError, match="init_from=b is no earlier stage"):
        load_recipe(str(bad))


def _turns(record: dict) -> list[str]:
    return [m["content"][-1]["text"] for m in record["messages"]]


def test_task_filter_keeps_leading_matching_turns(world_dir: Path) -> None:
    records = [
        {"id": "a", "task": "image/caption", "messages": [{"role": "user", "content": "q"}]},
        {
            "id": "b",
            "task": "audio/caption",
            "turn_tasks": ["audio/caption", "audio/pitch", "image/caption"],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q1"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
                {"role": "user", "content": [{"type": "text", "text": "q2"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
                {"role": "user", "content": [{"type": "text", "text": "q3"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a3"}]},
            ],
        },
        {"id": "c", "task": "image/color", "messages": []},
    ]
    kept = select_tasks(records, ["*/caption"])
    assert [r["id"] for r in kept] == ["a", "b"]
    assert kept[0] is records[0]
    assert _turns(kept[1]) == ["q1", "a1"] and kept[1]["turn_tasks"] == ["audio/caption"]
    assert len(records[1]["messages"]) == 6, "the input record is left as it was"
    both = select_tasks(records, ["audio/caption", "audio/pitch"])
    assert [r["id"] for r in both] == ["b"] and len(both[0]["messages"]) == 4
    with pytest.raises(ValueError, match=r"data.tasks=\['both/total'\].*image/color"):
        select_tasks(records, ["both/total"], "x.jsonl")

    dataset = ConversationDataset(world_dir / "train.jsonl", processor(), tasks=["image/*"])
    assert dataset.records and all(r["task"].startswith("image/") for r in dataset.records)
    assert all(
        all(t.startswith("image/") for t in r.get("turn_tasks", [])) for r in dataset.records
    )
    everything = [json.loads(x) for x in (world_dir / "train.jsonl").read_text().splitlines()]
    assert len(dataset) < len(everything)
