"""The LightningDataModule: splits a data set, fits the encoder on training rows, batches rows."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from purchasenet.datasets import TARGET, PurchaseDataset, Splits
from purchasenet.features import FeatureEncoder


class _InMemoryBatches(Dataset):
    """Rows held as two tensors; indexing with a list of rows returns the whole batch at once.

    Paired with a ``BatchSampler`` as the loader's sampler, this skips per-row collation, which
    otherwise costs more than the forward pass of a small network.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[rows], self.targets[rows]


class _ShareOfBatches(DistributedSampler):
    """This process's share of the rows, in batches, when several processes train together.

    Training shares are padded to equal length, so every process takes the same number of
    steps; evaluation shares are not, so each row is scored exactly once. Lightning keeps a
    loader's own ``DistributedSampler`` instead of wrapping it in one of its own.
    """

    def __init__(self, data: Dataset, batch_size: int, training: bool) -> None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(data, shuffle=training, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.training = training

    def _rows(self) -> list[int]:
        if self.training:
            return list(super().__iter__())
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        rows = self._rows()
        for start in range(0, len(rows), self.batch_size):
            yield rows[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self._rows()) / self.batch_size)


class PurchaseDataModule(L.LightningDataModule):
    """Serves one :class:`PurchaseDataset` as batches of encoded tensors."""

    def __init__(
        self,
        dataset: PurchaseDataset,
        batch_size: int = 32,
        eval_batch_size: int = 4096,
        scale: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.name = name or dataset.name
        self.batch_size = int(batch_size)
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

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        data = self._tensors[split]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            share = _ShareOfBatches(data, batch_size, training=shuffle)
            return DataLoader(data, sampler=share, batch_size=None)
        order = RandomSampler(data) if shuffle else SequentialSampler(data)
        return DataLoader(
            data, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def describe(self) -> dict[str, Any]:
        """Plain-data description stored in checkpoints."""
        return {
            "name": self.name,
            "task": self.task,
            "class_names": self.class_names,
            "target": self.dataset.target_name,
            "sizes": self.splits.sizes() if self.splits else {},
            "bayes_accuracy": self.dataset.bayes_accuracy,
        }
