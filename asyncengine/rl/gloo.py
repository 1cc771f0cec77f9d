"""The engine's side of the trainer's torch.distributed gloo group (one per process).

The group is torch.distributed's default group, joined with a tcp:// rendezvous at the
trainer's master address: a trainer that calls `init_process_group("gloo",
init_method="tcp://addr:port", rank=0, world_size=N)` and `broadcast(t, src=0)` (what
`asyncengine.rl.WeightSender` does) speaks to it without any library of ours.
Blocking calls: the HTTP layer runs them on worker threads.
"""
from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch
import torch.distributed as dist

from asyncengine.rl.protocol import InitInfo, TransferError, UpdateInfo


class GlooGroup:
    """Membership of the group; broken on any communication error (then close() it)."""

    def __init__(self, info: InitInfo, timeout_s: float) -> None:
        """Join the group (blocks until every rank has joined, or timeout_s)."""
        if dist.is_initialized():  # a previous group not closed: it is stale now
            dist.destroy_process_group()
        self.info = info
        try:
            dist.init_process_group(
                "gloo", init_method=f"tcp://{info.master_address}:{info.master_port}", rank=info.rank_offset,
                world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s),
            )
        except Exception as exc:  # refused connection, rendezvous timeout, rank clash
            _destroy()
            raise TransferError(f"could not join the gloo group at {info.master_address}:{info.master_port} as "
                                f"rank {info.rank_offset} of {info.world_size}: {exc}", 504, "rendezvous_failed") from exc

    def receive(self, update: UpdateInfo, flat: torch.Tensor,
                rank: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Each announced tensor, broadcast from rank 0, as a view of `flat` (uint8, at
        least the update's total size; the tensors lie back to back: in order in the
        packed layout, one broadcast per bucket; else one broadcast per tensor, laid in
        `rank` order). Nothing is copied, except a tensor whose offset does not suit its
        dtype (then a fresh tensor)."""
        offsets, sizes = update.offsets(rank), update.sizes()
        out: dict[str, torch.Tensor] = {}
        for name, dtype, shape, at, size in zip(update.names, update.dtypes, update.shapes, offsets, sizes):
            out[name] = _view(flat[at : at + size], dtype, shape)
        if update.packed:
            chunks = [flat[a:b] for a, b in update.buckets()]
        else:
            chunks = list(out.values())
        for i, chunk in enumerate(chunks):
            try:
                dist.broadcast(chunk, src=0)
            except Exception as exc:  # the trainer died, hung up, or stalled past the timeout
                timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
                what = "bucket" if update.packed else f"tensor {update.names[i]!r}"
                raise TransferError(f"the broadcast of {what} from the trainer failed ({i} of {len(chunks)} "
                                    f"{'buckets' if update.packed else 'tensors'} received): {exc}",
                                    504 if timed_out else 502,
                                    "transfer_timeout" if timed_out else "transfer_failed") from exc
        if update.packed:  # the misaligned ones were received into flat: copy them out
            for name, at, size in zip(update.names, offsets, sizes):
                t = out[name]
                if t.data_ptr() != flat[at:].data_ptr() and size:
                    t.view(-1).view(torch.uint8).copy_(flat[at : at + size])
        return out

    def close(self) -> None:
        _destroy()


def _destroy() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group may fail to tear down; it is gone either way
            pass


def _view(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """raw (uint8 bytes) seen as a tensor of dtype and shape, or a fresh one where the
    offset is not a multiple of the dtype's size (mixed dtypes back to back)."""
    try:
        return raw.view(dtype).view(shape)
    except RuntimeError:
        return torch.empty(shape, dtype=dtype)
