"""The LightningDataModule: splits a data set, fits the encoder on training rows, batches rows."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from purchasenet.datasets import TARGET, PurchaseDataset, Splits
from purchasenet.errors import ConfigError
from purchasenet.features import FeatureEncoder

Batch = tuple[torch.Tensor, torch.Tensor]


class _InMemoryBatches(Dataset):
    """Rows held as two tensors; indexing with a batch of rows returns the whole batch at once.

    A chunk (a list of batches) returns a list of batches. With a sampler that yields batches
    or chunks, this skips per-row collation, which costs more than a small network's forward.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, rows: Sequence[int] | torch.Tensor | list) -> Batch | list[Batch]:
        if isinstance(rows, list) and rows and not isinstance(rows[0], int):
            return [(self.inputs[batch], self.targets[batch]) for batch in rows]
        return self.inputs[rows], self.targets[rows]


def _chunked(batches: Sequence, chunk_batches: int) -> Iterator[list]:
    for start in range(0, len(batches), chunk_batches):
        yield list(batches[start : start + chunk_batches])


class _ShuffledChunks(Sampler):
    """One shuffle of the rows per epoch, cut into batches, grouped into chunks of batches."""

    def __init__(self, rows: int, batch_size: int, chunk_batches: int) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.chunk_batches = chunk_batches

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        order = torch.randperm(self.rows)
        yield from _chunked(torch.split(order, self.batch_size), self.chunk_batches)

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.rows / self.batch_size) / self.chunk_batches)


class _ShareOfBatches(DistributedSampler):
    """This process's share of the rows, in batches, when several processes train together.

    Training shares are padded to equal length, so every process takes the same number of
    steps; evaluation shares are not, so each row is scored exactly once. Lightning keeps a
    loader's own ``DistributedSampler`` instead of wrapping it in one of its own.
    """

    def __init__(
        self, data: Dataset, batch_size: int, training: bool, chunk_batches: int = 1
    ) -> None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(data, shuffle=training, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.training = training
        self.chunk_batches = chunk_batches if training else 0

    def _rows(self) -> list[int]:
        if self.training:
            return list(super().__iter__())
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[list]:
        rows = self._rows()
        batches = [rows[start : start + self.batch_size]
                   for start in range(0, len(rows), self.batch_size)]
        if self.chunk_batches:
            yield from _chunked(batches, self.chunk_batches)
        else:
            yield from batches

    def __len__(self) -> int:
        batches = math.ceil(len(self._rows()) / self.batch_size)
        return math.ceil(batches / self.chunk_batches) if self.chunk_batches else batches


class PurchaseDataModule(L.LightningDataModule):
    """Serves one :class:`PurchaseDataset` as batches of encoded tensors.

    Training batches come in chunks of ``chunk_batches`` mini-batches, each chunk one Lightning
    training step in which the model takes one optimizer step per mini-batch: the same updates
    as one Lightning step per mini-batch, without the framework's per-step cost, which
    otherwise dominates a network this small.
    """

    def __init__(
        self,
        dataset: PurchaseDataset,
        batch_size: int = 32,
        eval_batch_size: int = 4096,
        chunk_batches: int = 64,
        scale: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("chunk_batches", chunk_batches)):
            if int(value) < 1:
                raise ConfigError(f"data.{key} must be at least 1, got {value}")
        self.dataset = dataset
        self.name = name or dataset.name
        self.batch_size = int(batch_size)
        self.chunk_batches = int(chunk_batches)
        self.eval_batch_size = int(eval_batch_size)
        self.scale = scale
        self.encoder: FeatureEncoder | None = None
        self.splits: Splits | None = None
        self._tensors: dict[str, _InMemoryBatches] = {}

    @property
    def task(self) -> str:
        return self.dataset.task

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def input_size(self) -> int:
        assert self.encoder is not None, "call setup() first"
        return self.encoder.input_size

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.dataset.load()
        self.encoder = FeatureEncoder.fit(self.dataset.features, splits.train, scale=self.scale)
        for split in ("train", "val", "test"):
            frame = getattr(splits, split)
            inputs = torch.from_numpy(self.encoder.transform(frame))
            dtype = torch.float32 if self.task == "binary" else torch.int64
            targets = torch.tensor(frame[TARGET].to_numpy(dtype=np.int64), dtype=dtype)
            self._tensors[split] = _InMemoryBatches(inputs, targets)
        self.splits = splits

    def class_counts(self) -> list[int]:
        assert self.splits is not None, "call setup() first"
        counts = np.bincount(self.splits.train[TARGET], minlength=len(self.class_names))
        return counts.tolist()

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        data = self._tensors[split]
        if self._distributed():
            share = _ShareOfBatches(data, batch_size, training=False)
            return DataLoader(data, sampler=share, batch_size=None)
        batches = BatchSampler(SequentialSampler(data), batch_size, drop_last=False)
        return DataLoader(data, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        """Chunks of shuffled mini-batches; see the class docstring."""
        data = self._tensors["train"]
        if self._distributed():
            sampler = _ShareOfBatches(data, self.batch_size, True, self.chunk_batches)
        else:
            sampler = _ShuffledChunks(len(data), self.batch_size, self.chunk_batches)
        return DataLoader(data, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def describe(self) -> dict[str, Any]:
        """Plain-data description stored in checkpoints."""
        return {
            "name": self.name,
            "task": self.task,
            "class_names": self.class_names,
            "target": self.dataset.target_name,
            "sizes": self.splits.sizes() if self.splits else {},
            "bayes_accuracy": self.dataset.bayes_accuracy,
            "fingerprint": self.dataset.fingerprint(),
        }
