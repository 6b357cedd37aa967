"""One order of the training examples, the same whatever reads it, and the sampler that reads it.

`MixtureOrder` maps a position 0, 1, 2, ... of an endless stream to (dataset, record): each
dataset is visited in a new random permutation every epoch, and several datasets are
interleaved in proportion to their weights (grain's `MapDataset.mix`). Global batch k is
positions [k*B, (k+1)*B). Nothing in it depends on processes or data workers.

`GlobalOrderSampler` is the grain sampler that makes a `grain.DataLoader` read that order
a block at a time: block `k * P + p` is process p's rows [p*b, (p+1)*b) of global batch k
(P processes, b = B / P rows each, the row order `jax.make_array_from_process_local_data`
lays out). One grain element is one block, built whole by one data worker
(`pipeline.TrainBatches`); grain hands worker w the local elements w, w + W, w + 2W, ...
and takes the workers' outputs in turn, so local batch j is always global batch j's rows
for this process, whatever the number of workers.

The sampler's record key IS the block; the data source turns it into positions, and every
random choice about an example comes from its position. A loader can start at any global
batch (`start_batch`), which is how a checkpoint resumes on any number of processes or
workers: the position after step N is the start of global batch N.
"""

from __future__ import annotations

import grain
import numpy as np


class _Tag:
    """Pairs a dataset's record index with the dataset's number (picklable, for workers)."""

    def __init__(self, dataset: int):
        self.dataset = dataset

    def __call__(self, record) -> tuple[int, int]:
        return self.dataset, int(record)


class MixtureOrder:
    """position -> (dataset, record) over one or several datasets, epoch after epoch.

    Dataset d's permutations are seeded with `seed + d`; with one dataset the order is
    `MapDataset.range(n).shuffle(seed)`, epoch after epoch.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or min(sizes) <= 0 or len(weights) != len(sizes):
            raise ValueError(f"Need datasets with records and one weight each: {sizes}, {weights}")
        self.sizes, self.weights, self.seed = list(sizes), list(weights), seed
        streams = [
            grain.MapDataset.range(n).shuffle(seed=seed + d).repeat() for d, n in enumerate(sizes)
        ]
        if len(streams) == 1:
            self._stream = streams[0].map(_Tag(0))
        else:
            tagged = [s.map(_Tag(d)) for d, s in enumerate(streams)]
            self._stream = grain.MapDataset.mix(tagged, weights)

    def __getitem__(self, position: int) -> tuple[int, int]:
        dataset, record = self._stream[int(position)]
        return dataset, record % self.sizes[dataset]

    def __repr__(self) -> str:
        return f"MixtureOrder(sizes={self.sizes}, weights={self.weights}, seed={self.seed})"


class GlobalOrderSampler:
    """A grain sampler: the DataLoader asks for index `j * process_count + process_index`
    (its j-th local batch) and gets, as the record key, the block of global batch
    `start_batch + j` that this process reads.

    The process index and count (default: JAX's) are fixed at construction, in the main
    process, so worker processes that unpickle the sampler never touch JAX.
    """

    def __init__(
        self,
        *,
        process_batch: int,
        start_batch: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_batch <= 0 or start_batch < 0:
            raise ValueError(
                f"Need a positive batch and start_batch >= 0; got "
                f"process_batch={process_batch}, start_batch={start_batch}."
            )
        if process_index is None or process_count is None:
            self._shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        else:
            self._shard_options = grain.sharding.ShardOptions(
                process_index, process_count, drop_remainder=True
            )
        self.process_batch = process_batch
        self.start_batch = start_batch

    @property
    def process_index(self) -> int:
        return self._shard_options.shard_index

    @property
    def process_count(self) -> int:
        return self._shard_options.shard_count

    @property
    def shard_options(self) -> grain.sharding.ShardOptions:
        return self._shard_options

    @property
    def global_batch(self) -> int:
        return self.process_batch * self.process_count

    def block(self, index: int) -> int:
        """The block the DataLoader's `index` stands for: its positions are
        [block * process_batch, (block + 1) * process_batch)."""
        local, process = divmod(index, self.process_count)
        return (local + self.start_batch) * self.process_count + process

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"Sampler index must be non-negative, got {index}.")
        return grain.RecordMetadata(index=index, record_key=self.block(index))

    def __repr__(self) -> str:
        return (
            f"GlobalOrderSampler(process_batch={self.process_batch}, start_batch="
            f"{self.start_batch}, process={self.process_index}/{self.process_count})"
        )


def positions_of_batch(batch: int, global_batch: int) -> np.ndarray:
    """The global-order positions of global batch `batch` (for references and tests)."""
    return np.arange(batch * global_batch, (batch + 1) * global_batch)
