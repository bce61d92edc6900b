"""The ranks of a finished distributed job exit one after another, rank 0 first, so none aborts on its way out.

Rank 0 hosts the job's TCPStore and the first rank of each gloo sub-group hosts that group's store (`gloo_groups`).
Each store is served by a libuv thread that Paddle never stops: the store outlives Python's finalization, and the
thread still runs while `exit()` destroys the process's C++ statics. A client that disconnects at that moment (its
rank exiting at the same time) wakes the thread; its first `VLOG` on that path locks glog's static `vmodule_lock`,
which `exit()` has destroyed, the lock fails and glog calls abort(). The job then ends with exit code -6 after all
its work was done: 3 launches in 157 whose ranks finished together (Paddle 3.3.1, libuv TCPStore, 2 CPU cores).

Every store is hosted by the lowest rank among its users (rank 0 for the job's store, a group's first rank for a
sub-group's), so when rank r exits only after rank r - 1's process is gone, each host exits while its clients wait
idle, connected, and each client disconnects only from stores whose host is already gone.
"""
from __future__ import annotations

import os
import socket
from typing import List

import paddle.distributed as dist

from .logs import logger

__all__ = ["leave_in_rank_order"]

_HELD_FDS: List[int] = []  # successors' connections: closed by the kernel only when this process is gone


def leave_in_rank_order(timeout: float = 300.0) -> None:
    """Call on every rank at the end of a distributed job that did its work: returns at once on rank 0 and on rank r
    once rank r - 1's process has exited (or after `timeout` seconds). Does nothing outside a multi-process job."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    listener = socket.create_server(("", 0)) if rank + 1 < world_size else None
    host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").rsplit(":", 1)[0]
    addresses = []  # every rank's (host, port) its successor connects to; also a barrier: all ranks are done
    dist.all_gather_object(addresses, (host, listener.getsockname()[1]) if listener else None)
    try:
        predecessor = socket.create_connection(tuple(addresses[rank - 1]), timeout) if rank > 0 else None
        if listener is not None:
            listener.settimeout(timeout)
            successor, _ = listener.accept()
            _HELD_FDS.append(successor.detach())  # no Python object owns it: finalization cannot close it early
            listener.close()
        if predecessor is not None:
            predecessor.recv(1)  # b"" once rank r - 1's process has exited and its kernel closed the connection
            predecessor.close()
    except OSError as error:  # a peer that crashed or hangs: leave anyway
        logger.warning(f"rank {rank}: leaving without waiting for rank {rank - 1} to exit first ({error})")
