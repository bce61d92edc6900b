"""Worker of tests/test_exit_order.py: a 3-process job (the job's store on rank 0, a sub-group store on rank 1) that
leaves in rank order; each rank records whether its predecessor's process was still running when it left. Every
exit takes 2 s longer (an atexit pause) than the 1 s `running` waits, so a rank that did not wait would find its
predecessor running."""
import atexit
import json
import os
import sys
import time

import paddle.distributed as dist

from paddle_glm import gloo_groups
from paddle_glm.exit_order import leave_in_rank_order


def running(pid: int) -> bool:
    """False once the process has exited, also while it waits, a zombie, for the launcher to reap it. Its sockets
    close (what the successor waits for) at the end of its exit, a moment before it turns zombie: give it 1 s."""
    deadline = time.time() + 1.0
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.01)
    return True


atexit.register(time.sleep, 2.0)
gloo_groups.install()
dist.init_parallel_env()
dist.new_group([1, 2])  # hosted by rank 1, so rank 2 must not leave before rank 1
pids = []
dist.all_gather_object(pids, os.getpid())
leave_in_rank_order()
rank = dist.get_rank()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as record:
    json.dump({"predecessor_running": rank > 0 and running(pids[rank - 1])}, record)
