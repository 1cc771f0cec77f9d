"""The engine's side of the trainer's torch.distributed gloo group (one per process).

The group is torch.distributed's default group, joined with a tcp:// rendezvous at the
trainer's master address: a trainer that calls `init_process_group("gloo",
init_method="tcp://addr:port", rank=0, world_size=N)` and `broadcast(t, src=0)` (what
`asyncengine.rl.WeightSender` does) speaks to it without any library of ours.
Blocking calls: the HTTP layer runs them on worker threads.
"""
from __future__ import annotations

import datetime

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

    def receive(self, update: UpdateInfo) -> dict[str, torch.Tensor]:
        """Each announced tensor, broadcast from rank 0, into a new buffer (in order)."""
        out: dict[str, torch.Tensor] = {}
        for name, dtype, shape in zip(update.names, update.dtypes, update.shapes):
            buf = torch.empty(shape, dtype=dtype)
            try:
                dist.broadcast(buf, src=0)
            except Exception as exc:  # the trainer died, hung up, or stalled past the timeout
                timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
                raise TransferError(f"the broadcast of {name!r} from the trainer failed ({len(out)} of "
                                    f"{len(update.names)} tensors received): {exc}", 504 if timed_out else 502,
                                    "transfer_timeout" if timed_out else "transfer_failed") from exc
            out[name] = buf
        return out

    def close(self) -> None:
        _destroy()


def _destroy() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group may fail to tear down; it is gone either way
            pass
