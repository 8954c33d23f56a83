"""A process's rows of each global batch, assembled from a fixed number of data shards (any stage's data)."""

from __future__ import annotations

import json

import numpy as np


class HostBatches:
    """This process's rows of each global batch, drawn from a fixed number of data shards.

    The data is split into `num_shards` streams (`make_pipeline` with
    process_index=shard, process_count=num_shards) whatever the number of
    processes, and process p reads shards [p*k, (p+1)*k) for k = num_shards /
    process_count. So 1 process and 2 processes over the same shards assemble the
    same global batches, in the same row order, and see the same losses. Its state
    (every shard's position) saves through grain's orbax handler.
    """

    def __init__(self, make_shard, num_shards: int, process_index: int, process_count: int):
        if num_shards % process_count:
            raise ValueError(f"data.num_shards={num_shards} is not divisible by the {process_count} processes")
        per_process = num_shards // process_count
        shards = range(process_index * per_process, (process_index + 1) * per_process)
        self.iterators = [iter(make_shard(shard, num_shards)) for shard in shards]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps([it.get_state() for it in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        for it, shard_state in zip(self.iterators, json.loads(state), strict=True):
            it.set_state(shard_state)

    def start_prefetch(self) -> None:
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()
