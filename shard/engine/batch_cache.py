"""Running batches kept between RPCs, by batch id. The router refers to them by id."""

from __future__ import annotations

from shard.engine.batch import Batch, InvalidRequest


class BatchCache:
    def __init__(self):
        self._batches: dict[int, Batch] = {}

    def __len__(self) -> int:
        return len(self._batches)

    def pop(self, batch_id: int) -> Batch:
        batch = self._batches.pop(batch_id, None)
        if batch is None:
            raise InvalidRequest(f"batch {batch_id} not found in the shard's cache")
        return batch

    def put(self, batch: Batch | None) -> None:
        """Keeps a batch that still has work; a finished one (or None) is dropped."""
        if batch is not None and len(batch) and not batch.all_stopped:
            self._batches[batch.id] = batch

    def delete(self, batch_id: int) -> None:
        self._batches.pop(batch_id, None)

    def clear(self) -> None:
        self._batches.clear()

    @property
    def num_requests(self) -> int:
        return sum(len(b) for b in self._batches.values())
