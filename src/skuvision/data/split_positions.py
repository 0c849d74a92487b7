"""A split held in memory (Fashion-MNIST, CIFAR) for predict/embed on several processes: the positions not yet
in a resumed run's shards, each sample carrying its position and label, {"error": "", "index": position,
"label": label}, which Lightning's predict sampler deals among the processes (each once, no padding)."""

from __future__ import annotations

from collections.abc import Sequence

from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class PositionedSplit(Dataset):
    def __init__(self, dataset: Dataset, positions: Sequence[int]):
        self.dataset = dataset
        self.positions = list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.positions[i]]
        return image, {"error": "", "index": self.positions[i], "label": int(label)}


class SplitPositionsDataModule(LightningDataModule):
    """`positions` of `source`'s split `split` for Trainer.predict, batches made model input by `source`."""

    def __init__(self, source, split: str, positions: Sequence[int], batch_size: int):
        super().__init__()
        self.source = source
        self.split = split
        self.positions = positions
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        # In memory: a gather by index, no worker processes needed.
        dataset = PositionedSplit(self.source.splits[self.split], self.positions)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.source.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.source.on_after_batch_transfer(batch, dataloader_idx)
