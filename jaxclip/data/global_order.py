"""One shuffled order of the whole dataset, read by every process in its rows of each batch.

grain's usual per-process sharding splits the *records* into contiguous ranges and shuffles each
range on its own, so the global batches of a 2-process run differ from those of a 1-process
run. Here there is one global order (epoch by epoch, like an unsharded `IndexSampler`), and
global batch k is positions [k*B, (k+1)*B) of it; process p reads rows [p*b, (p+1)*b) of that
batch (b = B / process count). The global batches, and so training, depend neither on how many
processes feed them nor on how many data workers each process runs, and the rows arrive in
the order the global array lays them out.

Because the position after n batches follows from n alone, a checkpoint's data position also
carries over to another number of processes or workers (`GlobalOrderLoader.state_after`).
"""

from __future__ import annotations

import json

import grain
import numpy as np


class GlobalOrderSampler:
    """A grain sampler: the DataLoader asks for index `i * process_count + process_index`
    (its i-th local record) and gets the record at this process's matching global position.

    With `worker_count` W > 1, grain's DataLoader hands worker w the local records w, w + W,
    w + 2W, ...; each worker batches its own records, and the loader takes the workers'
    batches in turn. The sampler undoes that interleaving, so local batch j is still global
    batch j's rows for this process.

    The process index and count (default: JAX's) are fixed at construction, in the main
    process, so worker processes that unpickle the sampler never touch JAX.
    """

    def __init__(
        self,
        num_records: int,
        *,
        seed: int,
        process_batch: int,
        worker_count: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if num_records <= 0 or process_batch <= 0 or worker_count < 0:
            raise ValueError(
                f"Need records, a positive batch and worker_count >= 0; got num_records="
                f"{num_records}, process_batch={process_batch}, worker_count={worker_count}."
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
        self.worker_count = worker_count
        self._order = grain.MapDataset.range(num_records).shuffle(seed=seed)

    @property
    def process_index(self) -> int:
        return self._shard_options.shard_index

    @property
    def process_count(self) -> int:
        return self._shard_options.shard_count

    @property
    def shard_options(self) -> grain.sharding.ShardOptions:
        return self._shard_options

    def global_position(self, index: int) -> int:
        """Where the DataLoader's `index` lies in the global order (endless: epochs repeat)."""
        local, process = divmod(index, self.process_count)
        workers = max(self.worker_count, 1)
        nth, worker = divmod(local, workers)  # the worker's nth record
        worker_batch, row = divmod(nth, self.process_batch)
        batch = worker_batch * workers + worker  # the workers' batches are taken in turn
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

    def loader_state(self, template: dict, batches: int) -> dict:
        """grain's DataLoader iterator state after this process took `batches` batches.

        `template` is any state of the same loader (it carries the version and the reprs grain
        validates); only the positions are replaced. grain records, per worker, the last
        sampler index it handed out, and which worker's batch comes next.
        """
        if batches < 0:
            raise ValueError(f"batches must be >= 0, got {batches}.")
        processes, process = self.process_count, self.process_index
        workers = max(self.worker_count, 1)
        stride = workers * processes  # sampler indices between a worker's records
        last_seen = {}
        for worker in range(workers):
            worker_batches = max(0, -(-(batches - worker) // workers))
            records = worker_batches * self.process_batch
            last_seen[str(worker)] = process - stride + worker * processes + records * stride
        return {
            **template,
            "last_seen_indices": last_seen,
            "last_worker_index": (batches % workers) - 1 if self.worker_count else -1,
            "worker_count": self.worker_count,
        }

    def __repr__(self) -> str:
        # grain compares this with the checkpointed one before restoring an iterator.
        return (
            f"GlobalOrderSampler(num_records={self.num_records}, seed={self.seed}, "
            f"process_batch={self.process_batch}, process={self.process_index}/"
            f"{self.process_count})"
        )


class GlobalOrderLoader(grain.DataLoader):
    """A grain DataLoader over a `GlobalOrderSampler` that can be put at any step."""

    def __init__(self, *, sampler: GlobalOrderSampler, **kwargs):
        super().__init__(
            sampler=sampler,
            shard_options=sampler.shard_options,
            worker_count=sampler.worker_count,
            **kwargs,
        )
        self.sampler = sampler

    def state_after(self, iterator, batches: int) -> bytes:
        """The state (for `iterator.set_state`) that puts `iterator`, one of this loader's,
        after `batches` batches: the same place in the global order whatever process and
        worker counts a checkpoint was written with."""
        template = json.loads(iterator.get_state().decode())
        return json.dumps(self.sampler.loader_state(template, batches)).encode()
