"""Tests of data_modules.conversation's loader workers: one thread each, at a lower priority."""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import torch
from helpers import processor, record, write_media
from torch.utils.data import DataLoader, Dataset

from data_modules.conversation import ConversationDataModule, init_worker


class _WorkerState(Dataset):
    """Each item: the niceness and torch thread count of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int]:
        return os.nice(0), torch.get_num_threads()


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX niceness")
def test_a_worker_runs_one_thread_at_the_configured_niceness():
    own = os.nice(0)
    loader = DataLoader(
        _WorkerState(),
        batch_size=None,
        num_workers=1,
        worker_init_fn=partial(init_worker, nice=5),
    )
    assert [tuple(item) for item in loader] == [(min(own + 5, 19), 1)] * 2
    assert os.nice(0) == own  # the training process keeps its priority


def test_the_data_module_passes_its_niceness_to_every_loader(tmp_path):
    write_media(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record("r", "What color?", "red", image="a.png")) + "\n")
    module = ConversationDataModule(processor(), str(path), str(path), num_workers=1, worker_nice=7)
    module.setup("fit")
    loaders = [module.train_dataloader(), *module.val_dataloader()]
    assert [loader.worker_init_fn.keywords["nice"] for loader in loaders] == [7, 7, 7]


@pytest.mark.parametrize("nice", [-1, 20])
def test_niceness_out_of_range_is_refused(tmp_path, nice):
    with pytest.raises(ValueError, match="data.worker_nice must be between 0 and 19"):
        ConversationDataModule(processor(), str(tmp_path / "train.jsonl"), worker_nice=nice)
