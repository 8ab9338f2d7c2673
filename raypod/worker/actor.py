"""The Ray actor that hosts one rank: a thin remote shell around :class:`Trainer`.

The actor process imports torch as soon as it starts, so actors created early are
warm by the time the driver hands them a rank.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import ray

log = logging.getLogger("raypod.worker")


class TrainWorker:
    """One rank of the job, in its own process (see :func:`remote_worker_class`)."""

    def __init__(self, num_threads: int) -> None:
        import torch  # the expensive import happens while the driver does other work

        torch.set_num_threads(max(1, num_threads))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        self.trainer = None

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs."""
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids(),
        }

    def free_port(self) -> int:
        """A free TCP port on this node, for the rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def warm(self, config: Any, recipe: Any) -> dict[str, Any]:
        """Get ready to take a rank (a spare): load the data, so that joining is quick."""
        from raypod.worker.trainer import Trainer

        t0 = time.perf_counter()
        if self.trainer is None:
            self.trainer = Trainer(config, recipe)
        return {"warm_s": time.perf_counter() - t0}

    def setup(self, config: Any, recipe: Any, rank: int, world_size: int, init_method: str,
              injections: list, attempt: int, restore: tuple[str, int] | None,
              peers: tuple[int | None, int | None] = (None, None)) -> dict[str, Any]:
        """Join the process group, build the model shard, restore a checkpoint when asked."""
        t0 = time.perf_counter()
        self.warm(config, recipe)
        self.trainer.join(rank, world_size, init_method, injections, attempt, *peers)
        if restore is not None:
            self.trainer.load(*restore)
        self.trainer.feed.seek(rank, world_size, self.trainer.step + 1)  # start the data stream
        return {"rank": rank, "setup_s": time.perf_counter() - t0,
                "num_samples": len(self.trainer.data)}

    def reconfigure(self, config: Any, recipe: Any, rank: int, world_size: int, init_method: str,
                    injections: list, attempt: int, peers: tuple[int | None, int | None],
                    restore_step: int, moves: list[tuple[int, int, int]]) -> dict[str, Any]:
        """Leave the broken group, join the new one and restore ``restore_step`` from memory."""
        t = [time.perf_counter()]
        self.warm(config, recipe)
        self.trainer.leave()
        t.append(time.perf_counter())
        self.trainer.join(rank, world_size, init_method, injections, attempt, *peers)
        t.append(time.perf_counter())
        received = self.trainer.restore_memory(restore_step, moves)
        t.append(time.perf_counter())
        return {"rank": rank, "reconfigure_s": t[-1] - t[0], "received_bytes": received,
                "phases_s": {"leave": t[1] - t[0], "join": t[2] - t[1], "restore": t[3] - t[2]}}

    def memory_report(self) -> dict[str, Any]:
        """Steps of the snapshots this rank holds, its own and its peers' replicas."""
        return self.trainer.snapshots.report() if self.trainer else {"own": [], "replicas": {}}

    def train_step(self, step: int) -> dict[str, Any]:
        return self.trainer.train_step(step)

    def save(self, step: int, path: str) -> list[int]:
        return self.trainer.save(step, path)

    def finish_saves(self) -> list[int]:
        return self.trainer.finish_saves()

    def state_digest(self, export_path: str | None = None) -> str | None:
        return self.trainer.state_digest(export_path)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()


def remote_worker_class() -> Any:
    """``TrainWorker`` as a Ray actor class (made lazily so importing raypod stays cheap)."""
    return ray.remote(max_restarts=0, max_task_retries=0)(TrainWorker)
