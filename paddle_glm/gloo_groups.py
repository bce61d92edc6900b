"""Gloo sub-groups that do not cross-talk, so tensor x data parallelism forms on CPU.

Paddle 3.x's `ProcessGroupGloo` meets its peers in the job's one TCPStore under keys that name only the
rank inside the group (Paddle 2.x prefixed them with the group id), so sibling groups created together,
such as the model-parallel groups [0, 1] and [2, 3] of tp 2 x dp 2, read each other's addresses and
`fleet.init` dies with "Connection refused" or a gloo TIMEOUT. Here every gloo sub-group meets in a
TCPStore of its own, hosted by its first rank at an address it publishes in the job's store under the
group's unique name. The job-wide group and other backends are left as they are.

The host is the group's lowest global rank (groups list their ranks sorted), like rank 0 for the job's
store: `exit_order` relies on it to let every host exit before its clients.
"""
from __future__ import annotations

import os
import socket
from typing import Dict

import paddle.distributed.collective as collective
from paddle.base import core

__all__ = ["install"]

_STORES: Dict[str, core.TCPStore] = {}  # group name -> its store; gloo keeps using it while the group lives
_paddle_new_process_group = collective._new_process_group_impl


def _group_store(job_store, rank: int, world_size: int, group_name: str) -> core.TCPStore:
    key = f"paddle_glm/gloo_store/{group_name}"
    if rank == 0:
        host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").rsplit(":", 1)[0]
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        job_store.set(key, f"{host}:{port}")
    else:
        job_store.wait(key)
        host, port = job_store.get(key).decode().rsplit(":", 1)
    _STORES[group_name] = core.TCPStore(host, int(port), rank == 0, world_size)
    return _STORES[group_name]


def _new_process_group(backend, store, rank, world_size, group_name, pg_options, group_id=0, **kwargs):
    if backend == "gloo" and group_id != 0:  # gid 0: the job-wide group, built by init_parallel_env
        return core.ProcessGroupGloo.create(_group_store(store, rank, world_size, group_name), rank, world_size,
                                            group_id)
    return _paddle_new_process_group(backend, store, rank, world_size, group_name, pg_options, group_id, **kwargs)


def install() -> None:
    """Route `paddle.distributed.new_group` (what fleet's topology calls) through `_new_process_group`."""
    collective._new_process_group_impl = _new_process_group
