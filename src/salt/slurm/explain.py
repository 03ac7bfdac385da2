"""What Slurm said, in salt's words: sbatch's refusals and the queue's pending reasons, each
with what it means and which ``hydra.launcher.*`` key to change.

Pure functions of Slurm's text (and of the partition, when it could be read), so that each
message can be checked against what a real sbatch or squeue printed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from salt.slurm.partition import Partition, Request, misfit

Params = Mapping[str, Any]  # the launcher's settings (hydra.launcher.*)
SETTINGS = "conf/hydra/launcher/slurm.yaml"


def setting(params: Params, key: str) -> str:
    """``hydra.launcher.<key>=<value>`` as the command line writes it."""
    value = params.get(key)
    shown = "null" if value is None else str(value)
    return f"hydra.launcher.{key}={shown}"


# ---- sbatch's refusals --------------------------------------------------------------------
def sbatch_said(stderr: str, returncode: int = 1) -> str:
    """sbatch's own message on one line: its error lines without the ``sbatch: error:`` and
    ``Batch job submission failed:`` prefixes, the most specific first (sbatch prints the
    detail, then the generic failure)."""
    errors: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line.startswith("sbatch: error:"):
            continue
        text = line.removeprefix("sbatch: error:").strip()
        text = text.removeprefix("Batch job submission failed:").strip()
        if text and text not in errors:
            errors.append(text)
    if not errors:
        lines = [s.strip() for s in stderr.splitlines() if s.strip()]
        return lines[-1] if lines else f"sbatch exited with status {returncode}"
    first, *more = errors
    return f"{first} ({'; '.join(more)})" if more else first


Hint = Callable[[Params, Partition | None, Sequence[str] | None], str]


def _gpus(params: Params, part: Partition | None, _: Sequence[str] | None) -> str:
    keys = [setting(params, k) for k in ("gpus_per_node", "gpus_per_task", "gres") if params.get(k)]
    asked = " and ".join(keys) or "the job"
    most = part.node_gpus() if part is not None else None
    if part is not None and most:
        return (
            f"{asked} asks for more GPUs than the nodes of partition {part.name} have "
            f"({most}): lower it, or choose another partition (hydra.launcher.partition=...)"
        )
    where = f"partition {part.name} has none" if part is not None else "the partition has none"
    return (
        f"{asked} asks for GPUs and {where}: set hydra.launcher.gpus_per_node=null for a "
        "CPU-only job, or choose a partition with GPUs (hydra.launcher.partition=...)"
    )


def _partition(params: Params, _: Partition | None, names: Sequence[str] | None) -> str:
    known = f" (partitions: {', '.join(names)})" if names else ""
    if params.get("partition") is None:
        return f"choose a partition with hydra.launcher.partition=...{known}"
    return f"change {setting(params, 'partition')}{known}"


def _account(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    what = (
        f"change {setting(params, 'account')}"
        if params.get("account")
        else "set hydra.launcher.account=..."
    )
    return (
        f"{what} to an account of yours that may use the partition (`sacctmgr show "
        "associations user=$USER` lists them), or choose another hydra.launcher.partition"
    )


def _qos(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return f"change {setting(params, 'qos')} to a QOS your account may use (null: its default)"


def _policy(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return (
        "the job exceeds a limit of your account or QOS (size, time or number of jobs): lower "
        f"{setting(params, 'timeout_min')}, nodes, gpus_per_node or cpus_per_task, submit "
        "fewer points at once (hydra.sweeper.max_batch_size=...), or use another "
        "hydra.launcher.qos or account"
    )


def _time(params: Params, part: Partition | None, _: Sequence[str] | None) -> str:
    limit = part.max_time_min if part is not None else None
    where = f"partition {part.name}'s limit ({limit} min)" if part and limit else "a limit"
    return (
        f"{setting(params, 'timeout_min')} is above {where}: lower it, or choose another "
        "hydra.launcher.partition"
    )


def _memory(params: Params, part: Partition | None, _: Sequence[str] | None) -> str:
    most = part.node_memory_mb() if part is not None else None
    has = f" ({most / 1024:.1f} GB)" if most else ""
    where = f"the nodes of partition {part.name} have{has}" if part is not None else "a node has"
    for key in ("mem_gb", "mem_per_cpu", "mem_per_gpu"):
        if params.get(key) is not None:
            return f"{setting(params, key)} asks for more memory than {where}: lower it"
    return (
        f"the partition's default memory per CPU x {setting(params, 'cpus_per_task')} is more "
        f"than {where}: set hydra.launcher.mem_gb=... (GB per node) or fewer CPUs"
    )


def _node_shape(params: Params, part: Partition | None, _: Sequence[str] | None) -> str:
    found = misfit(Request.from_params(params), part) if part is not None else None
    if found:
        return found
    where = f"partition {part.name}" if part is not None else "the partition"
    keys = ", ".join(
        setting(params, k)
        for k in ("cpus_per_task", "tasks_per_node", "gpus_per_node", "mem_gb", "nodes")
    )
    extra = [setting(params, k) for k in ("constraint", "exclude") if params.get(k)]
    return f"no node of {where} can hold the job as asked: check {', '.join([keys, *extra])}"


def _nodes(params: Params, part: Partition | None, _: Sequence[str] | None) -> str:
    limit = part.node_limit() if part is not None else None
    most = f" (partition {part.name}: at most {limit})" if part and limit else ""
    return f"change {setting(params, 'nodes')}{most}"


def _node_names(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return (
        "a node named in hydra.launcher.exclude or additional_parameters (nodelist) does not "
        "exist: change it"
    )


def _feature(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return (
        f"{setting(params, 'constraint')} names a feature no node has (`sinfo -o '%P %f'` "
        "lists them): change it, or null"
    )


def _array(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return (
        "the sweep is one job array, larger than this cluster allows (MaxArraySize): submit it "
        "in parts with hydra.sweeper.max_batch_size=..."
    )


def _controller(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return "the Slurm controller did not answer: check that the cluster is up (sinfo), then retry"


def _tmp(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return "lower hydra.launcher.additional_parameters.tmp, the temporary disk it asks for"


def _reservation(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return "check the reservation in hydra.launcher.additional_parameters.reservation"


def _access(params: Params, _: Partition | None, __: Sequence[str] | None) -> str:
    return (
        "you may not submit there: check "
        f"{setting(params, 'partition')}, {setting(params, 'account')} and "
        f"{setting(params, 'qos')}"
    )


# sbatch's messages (Slurm's error table; the most specific first) -> the hint for them
REFUSALS: tuple[tuple[re.Pattern[str], Hint], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), hint)
    for pattern, hint in (
        (r"unable to contact slurm controller|zero bytes were transmitted", _controller),
        (r"generic resource|\bgres\b|gpu", _gpus),
        (r"accounting/qos policy", _policy),
        (r"invalid account|account/partition|default account|has no associations", _account),
        (r"\bqos\b", _qos),
        (r"partition configuration", _node_shape),
        (r"partition", _partition),
        (r"time limit|time specification", _time),
        (r"temporary disk", _tmp),
        (r"memory|--mem", _memory),
        (r"job array", _array),
        (r"feature", _feature),
        (r"reservation", _reservation),
        (r"node count", _nodes),
        (r"node name", _node_names),
        (
            r"socket, core|node configuration is not available|more processors|more tasks than|"
            r"task count",
            _node_shape,
        ),
        (r"access/permission denied|access denied", _access),
    )
)


def refusal(
    stderr: str,
    params: Params,
    partition: Partition | None = None,
    partitions: Sequence[str] | None = None,
    returncode: int = 1,
) -> str:
    """One line for a job sbatch refused: ``Slurm refused the job: <sbatch's message>; <what
    to change>``. ``partition``: the partition asked for (as read before submitting);
    ``partitions``: the cluster's partition names."""
    said = sbatch_said(stderr, returncode)
    for pattern, hint in REFUSALS:
        if pattern.search(said):
            return f"Slurm refused the job: {said}; {hint(params, partition, partitions)}"
    return (
        f"Slurm refused the job: {said}; check the hydra.launcher.* settings ({SETTINGS} "
        "lists them)"
    )


# ---- pending reasons ----------------------------------------------------------------------
# Reasons to keep waiting for: what they mean (squeue(1), JOB REASON CODES).
WAITING = {
    "None": "not yet looked at by the scheduler",
    "Resources": "the CPUs, GPUs or memory it needs are in use by other jobs",
    "Priority": "jobs of higher priority are ahead of it",
    "JobArrayTaskLimit": "at most hydra.launcher.array_parallelism tasks of the array run at once",
    "BeginTime": "its start time has not come yet",
    "Dependency": "it waits for another job",
    "ReqNodeNotAvail": "a node it needs is unavailable (down, drained or reserved)",
    "NodeDown": "a node it needs is down",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionNodeLimit": "the nodes it needs are down or drained",  # when `misfit` finds none
    "Reservation": "it waits for its reservation",
    "Licenses": "it waits for a license",
    "JobHeldUser": "it is held: `scontrol release <job id>` releases it",
    "JobHeldAdmin": "an administrator holds it",
    "Cleaning": "its previous run is being cleaned up",
    "Prolog": "the cluster's prolog is running",
}
# limits shared with other jobs: they lift when those jobs end
_SHARED_LIMIT = re.compile(r"^(QOS|Assoc)Grp|PerUser|PerAccount|JobLimit$|ResourceLimit$")
# a per-job limit of a QOS or association, or a QOS minimum: the job as asked never fits
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*Per(Job|Node)|^QOSMin")
# the key behind each resource of a per-job limit (the first match counts)
_LIMIT_KEYS = (
    ("Minutes", "timeout_min (or the job's size: time x resources is limited)"),
    ("WallDuration", "timeout_min"),
    ("GRES", "gpus_per_node"),
    ("Mem", "mem_gb"),
    ("Cpu", "cpus_per_task or tasks_per_node"),
    ("Node", "nodes"),
)
# reasons that never change by waiting: what they mean (a {p} stands for the partition)
_NEVER = {
    "PartitionConfig": (
        "the job asks for more than partition {p} allows per job or node; lower "
        "hydra.launcher.cpus_per_task, tasks_per_node, mem_gb, gpus_per_node or nodes"
    ),
    "PartitionTimeLimit": (
        "its time limit is above partition {p}'s; lower hydra.launcher.timeout_min"
    ),
    "BadConstraints": (
        "no node of partition {p} can satisfy its request; check hydra.launcher.mem_gb, "
        "mem_per_cpu, cpus_per_task, gpus_per_node and constraint"
    ),
    "InvalidAccount": "its account is invalid; change hydra.launcher.account",
    "AccountNotAllowed": "its account may not use partition {p}; change hydra.launcher.account",
    "InvalidQOS": "its QOS is invalid; change hydra.launcher.qos",
    "QOSNotAllowed": "its QOS may not be used here; change hydra.launcher.qos",
    "DependencyNeverSatisfied": "the job it depends on failed",
    "MaxMemPerLimit": "its memory per CPU or node is above the limit; lower hydra.launcher.mem_gb",
}
# reasons about the job's shape: the partition comparison names the key, when it finds one
_SHAPE = ("PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "BadConstraints")


def never_starts(reason: str, partition_name: str | None, found: str | None = None) -> str | None:
    """Why a job pending with ``reason`` can never start, and what to change; None when it
    may still start by waiting. ``found``: what `misfit` found comparing the request with the
    partition (it names the key better than the reason can)."""
    if found and reason in _SHAPE:
        return found
    p = partition_name or "(default)"
    if reason in _NEVER:
        return _NEVER[reason].format(p=p)
    if _PER_JOB_LIMIT.search(reason):
        owner = "QOS" if reason.startswith("QOS") else "association (user and account)"
        key = next((k for word, k in _LIMIT_KEYS if word in reason), None)
        if reason.startswith("QOSMin"):
            change = f"raise hydra.launcher.{key}, or use" if key else "use"
            return (
                f"the job asks for less than its QOS's minimum; {change} another hydra.launcher.qos"
            )
        change = f"lower hydra.launcher.{key}, or use" if key else "use"
        return (
            f"the job exceeds a per-job limit of its {owner}; {change} another "
            "hydra.launcher.qos or account"
        )
    return None


def waiting_for(reason: str) -> str:
    """What a pending reason that may still lift means, for a notice."""
    if reason in WAITING:
        return WAITING[reason]
    if _SHARED_LIMIT.search(reason):
        return "a limit shared with other jobs (yours, your account's or the QOS's) is reached"
    return "see `man squeue`, JOB REASON CODES"
