"""What a Slurm partition's nodes offer, and whether a job's request fits on them.

Slurm accepts some requests that no node of the partition can ever hold (e.g. 8 CPUs per task
on 2-CPU nodes: the job pends with reason PartitionConfig for good). Comparing the request with
the partition before submitting refuses them at once, naming the key; the same comparison
explains such a pending reason afterwards. Reading the partition is best effort: when scontrol
is missing, slow or says something unexpected, there is no comparison and Slurm decides.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCONTROL_TIMEOUT_S = 15
UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")
# key=value fields of `scontrol -o show ...` (values may not contain spaces, except OS=, which
# is not read: its other words simply match nothing)
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:]*)=(\S*)")
# GPUs in a node's Gres: "gpu:4", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2"
_GPUS = re.compile(r"(?:^|,)gpu(?::[A-Za-z0-9_.-]+)?:(\d+)")


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[Node, ...]  # empty when Slurm lists none (e.g. nodes added on demand)
    max_time_min: int | None = None  # None: no limit
    max_nodes: int | None = None  # per job
    max_cpus_per_node: int | None = None  # per job and node
    max_mem_per_node_mb: int | None = None

    def node_cpus(self) -> int | None:
        """The most CPUs one job may have on one node (None: no node listed)."""
        if not self.nodes:
            return None
        most = max(n.cpus for n in self.nodes)
        return most if self.max_cpus_per_node is None else min(most, self.max_cpus_per_node)

    def node_memory_mb(self) -> int | None:
        if not self.nodes:
            return None
        most = max(n.memory_mb for n in self.nodes)
        cap = self.max_mem_per_node_mb
        return most if cap is None else min(most, cap)

    def node_gpus(self) -> int | None:
        return max(n.gpus for n in self.nodes) if self.nodes else None

    def node_limit(self) -> int | None:
        """The most nodes one job may have."""
        if not self.nodes:
            return self.max_nodes
        return len(self.nodes) if self.max_nodes is None else min(len(self.nodes), self.max_nodes)


@dataclass(frozen=True)
class Request:
    """What one job asks for, from the launcher's settings (hydra.launcher.*)."""

    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float | None = None
    timeout_min: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Request:
        def number(key: str, default: int) -> int:
            value = params.get(key)
            return default if value is None else int(value)

        gpus = params.get("gpus_per_node")
        if isinstance(gpus, str):  # "a100:2": a typed request, of 2 GPUs
            tail = gpus.rpartition(":")[2]
            gpus = int(tail) if tail.isdigit() else 0
        mem = params.get("mem_gb")
        timeout = params.get("timeout_min")
        return cls(
            nodes=number("nodes", 1),
            tasks_per_node=max(1, number("tasks_per_node", 1)),
            cpus_per_task=max(1, number("cpus_per_task", 1)),
            gpus_per_node=int(gpus or 0),
            mem_gb=None if mem is None else float(mem),
            timeout_min=None if timeout is None else int(timeout),
        )


def slurm_minutes(text: str) -> int | None:
    """A Slurm time ("UNLIMITED", "30", "2:00:00", "1-12:00:00", "7-00:00") in minutes (None:
    no limit), rounded up as Slurm does; ValueError for anything else."""
    text = text.strip()
    if text.upper() in UNLIMITED:
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts[:3]
        total_s = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 3:  # hours:minutes:seconds
        total_s = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    elif len(parts) == 2:  # minutes:seconds
        total_s = parts[0] * 60 + parts[1]
    elif len(parts) == 1:  # minutes
        total_s = parts[0] * 60
    else:
        raise ValueError(f"not a Slurm time: {text!r}")
    return -(-total_s // 60)


def fields(line: str) -> dict[str, str]:
    """The key=value fields of one line of `scontrol -o show ...`."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(line)}


def _limit(value: str | None) -> int | None:
    if value is None or value.upper() in UNLIMITED:
        return None
    return int(value)


def parse_node(line: str) -> Node:
    f = fields(line)
    gpus = sum(int(n) for n in _GPUS.findall(f.get("Gres", "")))
    # CPUEfctv (Slurm >= 22.05): the CPUs jobs may use, without those reserved for the system
    cpus = f.get("CPUEfctv") or f["CPUTot"]
    return Node(f["NodeName"], int(cpus), int(f.get("RealMemory", "1")), gpus)


def parse_partitions(text: str) -> dict[str, dict[str, str]]:
    """`scontrol -o show partition`: the fields of each partition, by name."""
    out = {}
    for line in text.splitlines():
        f = fields(line)
        if "PartitionName" in f:
            out[f["PartitionName"]] = f
    return out


def partition_from(f: Mapping[str, str], node_lines: str) -> Partition:
    nodes = tuple(parse_node(line) for line in node_lines.splitlines() if "NodeName=" in line)
    return Partition(
        name=f["PartitionName"],
        nodes=nodes,
        max_time_min=slurm_minutes(f.get("MaxTime", "UNLIMITED")),
        max_nodes=_limit(f.get("MaxNodes")),
        max_cpus_per_node=_limit(f.get("MaxCPUsPerNode")),
        max_mem_per_node_mb=_limit(f.get("MaxMemPerNode")),
    )


def _scontrol(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", *args],
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def partition_names() -> list[str] | None:
    """The cluster's partitions (None: scontrol did not say)."""
    text = _scontrol("partition")
    return None if text is None else list(parse_partitions(text))


def read_partition(name: str | None) -> Partition | None:
    """Partition ``name`` (None: the cluster's default partition) and its nodes, as scontrol
    shows them; None when it cannot be read (no such partition, no scontrol, no answer)."""
    text = _scontrol("partition")
    if text is None:
        return None
    partitions = parse_partitions(text)
    if name is None:
        name = next((n for n, f in partitions.items() if f.get("Default") == "YES"), None)
    f = partitions.get(name) if name is not None else None
    if f is None:
        return None
    try:
        hosts = f.get("Nodes", "(null)")
        node_lines = "" if hosts in ("", "(null)") else _scontrol("node", hosts)
        if node_lines is None:
            return None
        return partition_from(f, node_lines)
    except (KeyError, ValueError):  # a format this reading does not know: no comparison
        return None


def misfit(request: Request, partition: Partition) -> str | None:
    """Why no node of ``partition`` can ever run ``request``, naming the hydra.launcher key to
    change (None: it fits, or the partition does not say). GPUs on a partition without any are
    left to sbatch, which refuses them at once (invalid gres)."""
    p = partition.name
    limit = partition.node_limit()
    if limit is not None and request.nodes > limit:
        return (
            f"hydra.launcher.nodes={request.nodes} asks for {request.nodes} nodes; a job on "
            f"partition {p} gets at most {limit}; lower it (or choose another partition: "
            "hydra.launcher.partition=...)"
        )
    cpus = partition.node_cpus()
    want = request.tasks_per_node * request.cpus_per_task
    if cpus is not None and want > cpus:
        if request.tasks_per_node == 1:
            asked = f"hydra.launcher.cpus_per_task={request.cpus_per_task} asks for {want} CPUs"
        else:
            asked = (
                f"hydra.launcher.tasks_per_node={request.tasks_per_node} x "
                f"cpus_per_task={request.cpus_per_task} ask for {want} CPUs"
            )
        most = cpus // request.tasks_per_node
        change = (
            f"lower hydra.launcher.cpus_per_task to at most {most}"
            if most >= 1
            else f"lower hydra.launcher.tasks_per_node to at most {cpus}"
        )
        return f"{asked} on one node, more than any node of partition {p} has ({cpus}); {change}"
    gpus = partition.node_gpus()
    if gpus and request.gpus_per_node > gpus:  # none at all: sbatch refuses the gres itself
        return (
            f"hydra.launcher.gpus_per_node={request.gpus_per_node} asks for "
            f"{request.gpus_per_node} GPUs on one node, more than any node of partition {p} has "
            f"({gpus}); lower it (by default it follows hydra.launcher.tasks_per_node)"
        )
    memory = partition.node_memory_mb()
    if memory is not None and request.mem_gb is not None and request.mem_gb * 1024 > memory:
        gb = f"{request.mem_gb:.0f}" if request.mem_gb.is_integer() else str(request.mem_gb)
        return (
            f"hydra.launcher.mem_gb={gb} asks for {gb} GB on one "
            f"node, more than any node of partition {p} has ({memory / 1024:.1f} GB); lower "
            "it (null: the partition's default)"
        )
    most_min = partition.max_time_min
    if most_min is not None and request.timeout_min is not None and request.timeout_min > most_min:
        return (
            f"hydra.launcher.timeout_min={request.timeout_min} is above the time limit of "
            f"partition {p} ({most_min} min); lower it to at most {most_min} (a run that "
            "reaches it is requeued and continues)"
        )
    return None
