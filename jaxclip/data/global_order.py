"""One shuffled order of the whole dataset, read by every process in its rows of each batch.

grain's usual per-process sharding splits the *records* into contiguous ranges and shuffles each
range on its own, so the global batches of a 2-process run differ from those of a 1-process
run. Here there is one global order (epoch by epoch, like an unsharded `IndexSampler`), and
global batch k is positions [k*B, (k+1)*B) of it; process p reads rows [p*b, (p+1)*b) of that
batch (b = B / process count). The global batches, and so training, do not depend on how many
processes feed them, and the rows arrive in the order the global array lays them out.
"""

from __future__ import annotations

import grain
import numpy as np


class GlobalOrderSampler:
    """A grain sampler: the DataLoader asks for index `i * process_count + process_index`
    (its i-th local record) and gets the record at this process's matching global position.

    The process index and count (default: JAX's) are fixed at construction, in the main
    process, so worker processes that unpickle the sampler never touch JAX.
    """

    def __init__(
        self,
        num_records: int,
        *,
        seed: int,
        process_batch: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if num_records <= 0 or process_batch <= 0:
            raise ValueError(
                f"Need records and a positive batch; got num_records={num_records}, "
                f"process_batch={process_batch}."
            )
        if process_index is None or process_count is None:
            self._shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        else:
            self._shard_options = grain.sharding.ShardOptions(
                process_index, process_count, drop_remainder=True
            )
        self.num_records = num_records
        self.seed = seed
        self.process_batch = process_batch
        self._order = grain.MapDataset.range(num_records).shuffle(seed=seed)

    @property
    def process_index(self) -> int:
        return self._shard_options.shard_index

    @property
    def process_count(self) -> int:
        return self._shard_options.shard_count

    def global_position(self, index: int) -> int:
        """Where the DataLoader's `index` lies in the global order (endless: epochs repeat)."""
        local, process = divmod(index, self.process_count)
        batch, row = divmod(local, self.process_batch)
        return (batch * self.process_count + process) * self.process_batch + row

    def record_key(self, position: int) -> int:
        """The record at `position` of the global order; each epoch has its own shuffle."""
        return int(self._order[position]) % self.num_records

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"Sampler index must be non-negative, got {index}.")
        position = self.global_position(index)
        # Random transforms draw from the record's position, so they agree across layouts too.
        rng = np.random.Generator(np.random.Philox(key=self.seed + position))
        return grain.RecordMetadata(index=index, record_key=self.record_key(position), rng=rng)

    def __repr__(self) -> str:
        # grain compares this with the checkpointed one before restoring an iterator.
        return (
            f"GlobalOrderSampler(num_records={self.num_records}, seed={self.seed}, "
            f"process_batch={self.process_batch}, process={self.process_index}/"
            f"{self.process_count})"
        )
