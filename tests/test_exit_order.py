"""Ranks of a finished job leave in rank order (paddle_glm.exit_order): no store host exits while a client leaves."""
from __future__ import annotations

import json

import pytest

from paddle_glm.exit_order import leave_in_rank_order
from test_parallel import launch


@pytest.mark.timeout(600)
def test_each_rank_leaves_after_its_predecessor_exited(tmp_path):
    launch(tmp_path, "tests/exit_order_worker.py", tmp_path, nproc=3)
    records = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in range(3)]
    assert [record["predecessor_running"] for record in records] == [False, False, False]


def test_outside_a_distributed_job_it_returns_at_once():
    leave_in_rank_order()
