"""Processed samples kept in memory, so that later epochs skip tokenising and media decoding.

Without augmentation a record always processes to the same ``Sample``, yet a loader redoes
the chat template and decodes the PNG and WAV files every epoch: on the demo about 30 ms of
CPU per batch of 32, taken from the two cores that train. ``SampleCache`` keeps each sample
the first time it is made, up to a byte budget (samples that come when it is full are made
anew every time), and hands the same object out again.

A cache lives in one process: each loader worker (persistent, so it lasts across epochs)
fills its own copy, so the memory used is up to the budget per worker and data set.
"""

from __future__ import annotations

import torch

from mmfuse.types import Sample


def sample_bytes(sample: Sample) -> int:
    """The bytes of a sample's tensors (token ids, media, cached features)."""
    tensors = [sample.input_ids, sample.labels, sample.prompt_ids, sample.image, sample.audio]
    tensors += list(sample.features.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class SampleCache:
    """Samples by record position, up to ``max_bytes`` of tensors.

    Args:
        max_bytes: budget; 0 keeps nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the sample cache budget must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.hits = self.misses = 0
        self._samples: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def get(self, position: int) -> Sample | None:
        sample = self._samples.get(position)
        if sample is None:
            self.misses += 1
        else:
            self.hits += 1
        return sample

    def clear(self) -> None:
        self._samples.clear()
        self.used_bytes = 0

    def put(self, position: int, sample: Sample) -> bool:
        """Keeps ``sample`` if it fits in what is left of the budget; returns whether it did."""
        size = sample_bytes(sample)
        if position in self._samples or self.used_bytes + size > self.max_bytes:
            return False
        self._samples[position] = sample
        self.used_bytes += size
        return True
