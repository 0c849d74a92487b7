"""A split of litdata shards (data=streaming) for predict/embed on several processes: litdata's own split of
the chunks among ranks and workers, with drop_last=False, so that every stored image is read by exactly one
process (litdata forces drop_last=True under DDP unless told otherwise, which would leave up to ranks x batch
- 1 images out).

Each sample carries its position, the `index` shard.py stored beside the image (its row in the source split),
with its label: {"error": "", "index": position, "label": label}. Input order is that stored order, not the
stream's (litdata.optimize with several workers writes chunks out of order). Positions already in a resumed
run's shards (`done`) are skipped before their image is decoded.
"""

from __future__ import annotations

import numpy as np
from litdata import StreamingDataLoader, StreamingDataset
from pytorch_lightning import LightningDataModule

from skuvision.data.streaming import DecodeSample, join
from skuvision.errors import SkuvisionError


class PositionedSample:
    """litdata's per-item transform: a stored item -> (image, meta), or None where its position is done."""

    def __init__(self, decode: DecodeSample, done: np.ndarray, where: str):
        self.decode = decode
        self.done = done
        self.where = where

    def __call__(self, item: dict):
        position = item.get("index")
        if not isinstance(position, int) or not 0 <= position < len(self.done):
            raise SkuvisionError(
                f"{self.where}: a stored item has index {position!r}, not a row of the {len(self.done)} "
                "images its metadata counts: write the shards again with python shard.py"
            )
        if self.done[position]:
            return None
        image, label = self.decode(item)
        return image, {"error": "", "index": position, "label": label}


class PositionedStream(StreamingDataset):
    """A StreamingDataset that leaves out the items its transform returned None for."""

    def __next__(self):
        item = super().__next__()
        while item is None:
            item = super().__next__()
        return item


def stored_count(source, split: str) -> int:
    """Images of `split` in the shards, from their metadata."""
    return int(sum(source.metadata["counts"][split].values()))


class StreamPositionsDataModule(LightningDataModule):
    """`split` of a StreamingDataModule (`source`) for Trainer.predict, every position not in `done` once."""

    def __init__(self, source, split: str, batch_size: int, num_workers: int, done: np.ndarray | None = None):
        super().__init__()
        self.source = source
        self.split = split
        self.batch_size = batch_size
        self.num_workers = num_workers
        count = stored_count(source, split)
        self.done = np.zeros(count, dtype=bool) if done is None else done

    def predict_dataloader(self):
        # Made here, inside each process: litdata divides the chunks by the process group it finds.
        source = self.source
        where = join(source.root, self.split)
        decode = DecodeSample(source.eval_transform, source.in_chans, source.pixel_budget)
        dataset = PositionedStream(
            where,
            cache_dir=source.cache_dir,
            shuffle=False,
            drop_last=False,
            max_cache_size=source.max_cache_size,
            transform=PositionedSample(decode, self.done, where),
        )
        # litdata deals whole batches to ranks: each process must get one, whatever the split's size.
        processes = self.trainer.world_size if self.trainer is not None else 1
        batch_size = min(self.batch_size, max(1, len(self.done) // processes))
        return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.source.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.source.on_after_batch_transfer(batch, dataloader_idx)
