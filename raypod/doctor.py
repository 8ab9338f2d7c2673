"""Pre-flight health checks: ``raypod doctor``, and the same checks before every job.

On every node: torch imports, the devices are visible (GPU count and memory where
there are GPUs), the checkpoint storage is writable; across the group, an all-reduce
measures the bus bandwidth (gloo on CPU, NCCL on GPU).

Before a job, each rank runs :func:`node_checks` and :func:`allreduce_check` in the
actor and process group it trains in, right after joining (no extra processes; a few
milliseconds plus one all-reduce of ``doctor.allreduce_mb``). A node that fails is
excluded from the next placement (a ``ray.io/node-id`` label selector) with the check
named; when every node fails the same way the job is refused with that sentence.

``raypod doctor`` places one probe actor per alive node and prints one row per node; a
single node gets a second probe that only joins the all-reduce (so that one machine
still measures it) and has no row of its own. Without a config it checks no storage
(the default ``./raypod_runs`` is not the user's; nothing is created in the current folder).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from raypod.redact import redact_text, redact_uri

CHECKS = ("torch", "devices", "storage", "allreduce")


@dataclass
class Check:
    """One check on one node."""

    name: str
    ok: bool
    detail: str


@dataclass
class NodeReport:
    """Every check of one node (or one rank)."""

    node_id: str
    hostname: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failing(self) -> Check | None:
        """The first failing check, if any."""
        return next((c for c in self.checks if not c.ok), None)

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "hostname": self.hostname,
                "checks": [asdict(c) for c in self.checks]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> NodeReport:
        return NodeReport(d["node_id"], d["hostname"], [Check(**c) for c in d["checks"]])


# ---- checks (run on the node) ---------------------------------------------------------


def _torch_check() -> tuple[Check, Any]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", False, f"torch does not import: {type(e).__name__}: {e}"), None
    return Check("torch", True, f"torch {torch.__version__}"), torch


def _devices_check(torch: Any, use_gpu: bool) -> Check:
    if torch is None:
        return Check("devices", False, "torch is missing")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        mem = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(n)]
        return Check("devices", True, f"{n} GPU ({', '.join(f'{m:.0f} GiB' for m in mem)})")
    if use_gpu:
        return Check("devices", False, "no GPU visible (scaling.use_gpu is true)")
    return Check("devices", True, f"CPU, {os.cpu_count()} cores")


def storage_check(storage: str) -> Check:
    """Write, read back and delete a small file under ``storage``."""
    from raypod.storage import get_fs

    probe = f"{storage.rstrip('/')}/.raypod-doctor/{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = get_fs(probe)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        t0 = time.perf_counter()
        fs.pipe_file(path, b"raypod doctor")
        back = fs.cat_file(path)
        fs.rm(path)
        ms = (time.perf_counter() - t0) * 1000
    except Exception as e:  # noqa: BLE001 - any storage error is the finding
        return Check("storage", False, redact_text(f"'{storage}' is not writable: {type(e).__name__}: {e}"))
    if back != b"raypod doctor":
        return Check("storage", False, f"'{redact_uri(storage)}' did not read back what was written")
    return Check("storage", True, f"writable ({ms:.0f} ms round trip)")


STORAGE_SKIPPED = "skipped: no config given (raypod doctor CONFIG checks its checkpoint.storage)"


def node_checks(storage: str | None, use_gpu: bool) -> list[Check]:
    """torch, devices and storage checks (``storage`` None: skipped), on the node this runs on."""
    torch_check, torch = _torch_check()
    store = storage_check(storage) if storage is not None else Check("storage", True, STORAGE_SKIPPED)
    return [torch_check, _devices_check(torch, use_gpu), store]


def allreduce_check(size_mb: float, min_mb_s: float, group: Any = None) -> Check:
    """Time one all-reduce of ``size_mb`` over the default (or given) process group.

    Reports the bus bandwidth, ``size * 2 (n - 1) / n / seconds`` (the NCCL-tests
    convention), so figures compare across world sizes.
    """
    import torch
    import torch.distributed as dist

    try:
        n = dist.get_world_size(group)
        nccl = "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available()
        backend = "nccl" if nccl else "gloo"  # a "cpu:gloo,cuda:nccl" group: NCCL for CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        x = torch.ones(max(1, int(size_mb * 2**20 / 4)), device=device)
        dist.all_reduce(x[:1024], group=group)  # warm the connections
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a broken collective is the finding
        return Check("allreduce", False, f"all-reduce failed: {type(e).__name__}: {e}")
    if n < 2:
        return Check("allreduce", True, "single rank: nothing to measure")
    bus = x.numel() * 4 * 2 * (n - 1) / n / dt / 1e6
    detail = f"{bus:,.0f} MB/s bus ({backend}, {size_mb:g} MB over {n} ranks in {dt * 1000:.0f} ms)"
    if min_mb_s and bus < min_mb_s:
        return Check("allreduce", False, f"{detail}, below doctor.min_allreduce_mb_s={min_mb_s:g}")
    return Check("allreduce", True, detail)


def rank_preflight(config: Any) -> dict[str, Any]:
    """What a rank checks right after joining its group (the pre-job doctor)."""
    import ray

    checks = node_checks(config.job_dir, config.scaling.use_gpu)[1:]  # torch imported already
    checks.append(allreduce_check(config.doctor.allreduce_mb, config.doctor.min_allreduce_mb_s))
    node = ray.get_runtime_context().get_node_id()
    return NodeReport(node, socket.gethostname(), checks).to_dict()


def failing_nodes(reports: list[dict[str, Any]]) -> dict[str, str]:
    """``node_id -> "check: detail"`` of the first failing check on each failing node."""
    out: dict[str, str] = {}
    for d in reports:
        bad = NodeReport.from_dict(d).failing
        if bad is not None and d["node_id"] not in out:
            out[d["node_id"]] = f"{bad.name}: {bad.detail}"
    return out


# ---- raypod doctor --------------------------------------------------------------------


class DoctorProbe:
    """A small actor pinned to one node: runs the node checks, then joins the all-reduce."""

    def info(self) -> dict[str, Any]:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"ip": ray.util.get_node_ip_address(), "port": port}

    def run(self, storage: str | None, use_gpu: bool, init_method: str, rank: int, world_size: int,
            size_mb: float, min_mb_s: float, timeout_s: float, partner: bool = False) -> dict[str, Any]:
        """The node checks (not for a ``partner``, which only joins the all-reduce), then the all-reduce."""
        from datetime import timedelta

        import ray

        checks = [] if partner else node_checks(storage, use_gpu)
        try:
            import torch
            import torch.distributed as dist

            backend = "nccl" if use_gpu and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(0)
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
            checks.append(allreduce_check(size_mb, min_mb_s))
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - a failed rendezvous is the finding
            checks.append(Check("allreduce", False, f"could not join the group: {type(e).__name__}: {e}"))
        return NodeReport(ray.get_runtime_context().get_node_id(), socket.gethostname(), checks).to_dict()


def run_doctor(config: Any, timeout_s: float = 120.0, check_storage: bool = True) -> list[dict[str, Any]]:
    """Probe every alive node of the connected Ray cluster; one report per node.

    ``check_storage`` False skips the storage check (``raypod doctor`` without a config).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise RuntimeError("the Ray cluster has no alive node with CPUs")
    placed = [nodes[i % len(nodes)] for i in range(max(2, len(nodes)))]
    use_gpu = config.scaling.use_gpu
    # No GPU is reserved (a busy node is still probed); with GPUs, Ray is asked not to hide
    # the node's devices from the probe, so that it counts them all.
    env = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}} if use_gpu else None
    cls = ray.remote(num_cpus=0, num_gpus=0, max_restarts=0)(DoctorProbe)
    probes = [cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                          runtime_env=env).remote()
              for n in placed]
    try:
        first = ray.get(probes[0].info.remote(), timeout=timeout_s)
        init = f"tcp://{first['ip']}:{first['port']}"
        storage = config.job_dir if check_storage else None
        refs = [p.run.remote(storage, use_gpu, init, r, len(probes), config.doctor.allreduce_mb,
                             config.doctor.min_allreduce_mb_s, min(timeout_s, config.fault.pg_timeout_s),
                             r >= len(nodes))
                for r, p in enumerate(probes)]
        reports = ray.get(refs, timeout=timeout_s)
        out = reports[:len(nodes)]
        for extra in reports[len(nodes):]:  # a partner's failed all-reduce is its node's
            bad = [c for c in extra["checks"] if not c["ok"]]
            mine = next((d for d in out if d["node_id"] == extra["node_id"]), None)
            if bad and mine is not None and all(c["ok"] for c in mine["checks"] if c["name"] == "allreduce"):
                mine["checks"] = [c for c in mine["checks"] if c["name"] != "allreduce"] + bad
        return out
    finally:
        for p in probes:
            ray.kill(p, no_restart=True)


def print_table(reports: list[dict[str, Any]]) -> None:
    """One row per probe: node, host, each check's result, the verdict."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="raypod doctor")
    for col in ("node", "host", *CHECKS, "result"):
        table.add_column(col, overflow="fold")
    for d in reports:
        rep = NodeReport.from_dict(d)
        by_name = {c.name: c for c in rep.checks}
        cells = []
        for name in CHECKS:
            c = by_name.get(name)
            cells.append("-" if c is None else (f"[green]{c.detail}[/]" if c.ok else f"[red]FAIL {c.detail}[/]"))
        table.add_row(rep.node_id[:12], rep.hostname, *cells,
                      "[green]ok[/]" if rep.ok else f"[red]FAIL: {rep.failing.name}[/]")
    Console(width=200).print(table)
