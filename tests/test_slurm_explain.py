"""What Slurm says, in salt's words: sbatch's refusals, pending reasons and partition limits,
from the text a real Slurm printed (no cluster needed).

The sbatch messages marked "live" were captured from sbatch 22.05 on the local cluster of
scripts/slurm/ (one 2-CPU node without GPUs, partition debug, no accounting); the others are
entries of the error table of the same Slurm's libslurm, which sbatch prints after
"Batch job submission failed:" (they need accounting, QOS or partition limits to provoke).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import salt
from salt.slurm.explain import never_starts, refusal, sbatch_said, waiting_for
from salt.slurm.partition import (
    Node,
    Partition,
    Request,
    misfit,
    parse_node,
    parse_partitions,
    partition_from,
    slurm_minutes,
)

# the salt under test (the one the command's subprocess must run)
SRC = Path(salt.__file__).resolve().parents[1]

# `scontrol -o show partition` and `scontrol -o show node vm` of the local cluster (live)
PARTITION_LINE = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL "
    "Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 "
    "Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED "
    "Nodes=vm PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO "
    "OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=2 TotalNodes=1 "
    "SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED "
    "MaxMemPerNode=UNLIMITED TRES=cpu=2,mem=24105M,node=1,billing=2"
)
NODE_LINE = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=2  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=2.08 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 "
    "NodeHostName=vm Version=22.05.8 OS=Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0  "
    "RealMemory=24105 AllocMem=0 FreeMem=19012 Sockets=1 Boards=1 State=IDLE ThreadsPerCore=1 "
    "TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  "
    "BootTime=2026-12-01T02:56:50 SlurmdStartTime=2026-12-01T11:02:50 "
    "LastBusyTime=2026-12-01T11:09:34 CfgTRES=cpu=2,mem=24105M,billing=2 AllocTRES= "
    "CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 "
    "ExtSensorsTemp=n/s"
)
LOCAL = partition_from(parse_partitions(PARTITION_LINE)["debug"], NODE_LINE)
# the same partition as a GPU cluster would show it: 4 A100 per node, a 12-hour limit
GPU = Partition("gpu", (Node("g1", 64, 512000, 4), Node("g2", 64, 512000, 4)), max_time_min=720)
# the launcher's settings as conf/hydra/launcher/slurm.yaml composes them (CPU-only on debug)
PARAMS = {
    "partition": None,
    "account": None,
    "qos": None,
    "timeout_min": 1440,
    "nodes": 1,
    "tasks_per_node": 1,
    "gpus_per_node": None,
    "cpus_per_task": 1,
    "mem_gb": None,
    "constraint": None,
}

LIVE = {
    "gres": "sbatch: error: Invalid generic resource (gres) specification",
    "partition": (
        "sbatch: error: invalid partition specified: nope\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified"
    ),
    "array": "sbatch: error: Batch job submission failed: Invalid job array specification",
    "feature": "sbatch: error: Batch job submission failed: Invalid feature specification",
    "node name": "sbatch: error: Batch job submission failed: Invalid node name specified",
    "reservation": "sbatch: error: Batch job submission failed: Requested reservation is invalid",
    "memory": (
        "sbatch: error: Memory specification can not be satisfied\n"
        "sbatch: error: Batch job submission failed: Requested node configuration is not "
        "available"
    ),
    "tmp": (
        "sbatch: error: Temporary disk specification can not be satisfied\n"
        "sbatch: error: Batch job submission failed: Requested node configuration is not "
        "available"
    ),
    "cores": (
        "sbatch: error: Socket, core and/or thread specification can not be satisfied\n"
        "sbatch: error: Batch job submission failed: Requested node configuration is not "
        "available"
    ),
    "node config": (
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    ),
    "controller": (
        "sbatch: error: Batch job submission failed: Unable to contact slurm controller "
        "(connect failure)"
    ),
}
FAILED = "sbatch: error: Batch job submission failed: "
TABLE = {  # libslurm's error table
    "account": FAILED + "Invalid account or account/partition combination specified",
    "qos": FAILED + "Invalid qos specification",
    "policy": FAILED
    + "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)",
    "time": FAILED + "Requested time limit is invalid (missing or exceeds some limit)",
    "node count": FAILED + "Node count specification invalid",
    "processors": FAILED + "More processors requested than permitted",
    "partition config": FAILED + "Requested partition configuration not available now",
    "group": FAILED + "User's group not permitted to use this partition",
    "access": FAILED + "Access/permission denied",
}


# ---- sbatch's refusals --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stderr", "said"),
    [
        (LIVE["gres"], "Invalid generic resource (gres) specification"),
        (LIVE["partition"], "invalid partition specified: nope (Invalid partition name specified)"),
        (
            LIVE["memory"],
            "Memory specification can not be satisfied (Requested node configuration is not "
            "available)",
        ),
        (LIVE["array"], "Invalid job array specification"),
        (
            "sbatch: warning: something\n" + LIVE["gres"],
            "Invalid generic resource (gres) specification",
        ),
        ("", "sbatch exited with status 1"),
        ("some wrapper failed\n", "some wrapper failed"),
    ],
)
def test_sbatch_said_is_slurms_own_words_on_one_line(stderr: str, said: str) -> None:
    assert sbatch_said(stderr) == said


@pytest.mark.parametrize(
    ("stderr", "params", "partition", "hint"),
    [
        (
            LIVE["gres"],
            {"gpus_per_node": 1},
            LOCAL,
            "hydra.launcher.gpus_per_node=1 asks for GPUs and partition debug has none: set "
            "hydra.launcher.gpus_per_node=null for a CPU-only job",
        ),
        (
            LIVE["gres"],
            {"gpus_per_node": 8},
            GPU,
            "hydra.launcher.gpus_per_node=8 asks for more GPUs than the nodes of partition gpu "
            "have (4): lower it",
        ),
        (LIVE["gres"], {"gpus_per_node": 1}, None, "hydra.launcher.gpus_per_node=null"),
        (
            LIVE["partition"],
            {"partition": "nope"},
            None,
            "change hydra.launcher.partition=nope (partitions: debug, gpu)",
        ),
        (LIVE["array"], {}, LOCAL, "hydra.sweeper.max_batch_size="),
        (LIVE["feature"], {"constraint": "a100"}, LOCAL, "hydra.launcher.constraint=a100"),
        (LIVE["node name"], {}, LOCAL, "hydra.launcher.exclude"),
        (LIVE["reservation"], {}, LOCAL, "additional_parameters.reservation"),
        (
            LIVE["memory"],
            {"mem_gb": 1000},
            LOCAL,
            "hydra.launcher.mem_gb=1000 asks for more memory than the nodes of partition debug "
            "have (23.5 GB): lower it",
        ),
        (LIVE["memory"], {"mem_gb": None}, LOCAL, "set hydra.launcher.mem_gb="),
        (LIVE["tmp"], {}, LOCAL, "additional_parameters.tmp"),
        (
            LIVE["cores"],
            {"cpus_per_task": 8},
            LOCAL,
            "hydra.launcher.cpus_per_task=8 asks for 8 CPUs on one node, more than any node of "
            "partition debug has (2); lower hydra.launcher.cpus_per_task to at most 2",
        ),
        (LIVE["node config"], {"exclude": "vm"}, LOCAL, "hydra.launcher.exclude=vm"),
        (LIVE["node config"], {"gpus_per_node": 8}, GPU, "than any node of partition gpu has (4)"),
        (LIVE["controller"], {}, None, "the Slurm controller did not answer"),
        (TABLE["account"], {"account": "atlas"}, LOCAL, "change hydra.launcher.account=atlas"),
        (TABLE["account"], {}, LOCAL, "set hydra.launcher.account=..."),
        (TABLE["qos"], {"qos": "fast"}, LOCAL, "change hydra.launcher.qos=fast"),
        (TABLE["policy"], {}, LOCAL, "lower hydra.launcher.timeout_min=1440"),
        (
            TABLE["time"],
            {"timeout_min": 1440},
            GPU,
            "hydra.launcher.timeout_min=1440 is above partition gpu's limit (720 min)",
        ),
        (TABLE["node count"], {"nodes": 3}, GPU, "change hydra.launcher.nodes=3 (partition gpu"),
        (TABLE["processors"], {"cpus_per_task": 3}, LOCAL, "lower hydra.launcher.cpus_per_task"),
        (TABLE["partition config"], {"nodes": 2}, LOCAL, "hydra.launcher.nodes=2 asks for 2"),
        (TABLE["group"], {"partition": "gpu"}, GPU, "change hydra.launcher.partition=gpu"),
        (TABLE["access"], {}, LOCAL, "check hydra.launcher.partition=null"),
    ],
)
def test_each_refusal_names_what_to_change(
    stderr: str, params: dict, partition: Partition | None, hint: str
) -> None:
    line = refusal(stderr, {**PARAMS, **params}, partition, ["debug", "gpu"])
    assert line.startswith(f"Slurm refused the job: {sbatch_said(stderr)}; ")
    assert "\n" not in line
    assert hint in line, line


def test_an_unknown_refusal_keeps_slurms_words_and_points_at_the_settings() -> None:
    stderr = "sbatch: error: Batch job submission failed: You must specify a project (site rule)"
    assert refusal(stderr, PARAMS, LOCAL) == (
        "Slurm refused the job: You must specify a project (site rule); check the "
        "hydra.launcher.* settings (conf/hydra/launcher/slurm.yaml lists them)"
    )


# ---- partitions -----------------------------------------------------------------------------
def test_the_local_clusters_partition_is_read_as_scontrol_shows_it() -> None:
    read = LOCAL
    assert read == Partition("debug", (Node("vm", 2, 24105, 0),))
    assert (LOCAL.node_cpus(), LOCAL.node_limit(), LOCAL.node_gpus()) == (2, 1, 0)


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("(null)", 0),
        ("gpu:4", 4),
        ("gpu:a100:4(S:0-1)", 4),
        ("gpu:a100:2,gpu:v100:2", 4),
        ("shard:8,gpu:h100:8(S:0-1)", 8),
        ("mps:100", 0),
    ],
)
def test_gpus_of_a_node(gres: str, gpus: int) -> None:
    assert parse_node(NODE_LINE.replace("Gres=(null)", f"Gres={gres}")).gpus == gpus


def test_a_partitions_limits_cap_its_nodes() -> None:
    line = (
        PARTITION_LINE.replace("MaxNodes=UNLIMITED", "MaxNodes=1")
        .replace("MaxTime=UNLIMITED", "MaxTime=2-00:00:00")
        .replace("MaxCPUsPerNode=UNLIMITED", "MaxCPUsPerNode=1")
        .replace("MaxMemPerNode=UNLIMITED", "MaxMemPerNode=1024")
    )
    two_nodes = NODE_LINE + "\n" + NODE_LINE.replace("NodeName=vm", "NodeName=vm2")
    part = partition_from(parse_partitions(line)["debug"], two_nodes)
    assert (part.node_limit(), part.node_cpus(), part.node_memory_mb()) == (1, 1, 1024)
    assert part.max_time_min == 2880


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("UNLIMITED", None),
        ("INFINITE", None),
        ("30", 30),
        ("30:30", 31),
        ("2:00:00", 120),
        ("1-12:00:00", 2160),
        ("7-00:00", 10080),
        ("1-0", 1440),
    ],
)
def test_slurm_times(text: str, minutes: int | None) -> None:
    assert slurm_minutes(text) == minutes


def test_a_time_slurm_never_writes_is_refused() -> None:
    with pytest.raises(ValueError):
        slurm_minutes("1:2:3:4")


def test_the_request_reads_the_launchers_settings() -> None:
    assert Request.from_params(PARAMS) == Request(timeout_min=1440)
    typed = Request.from_params({**PARAMS, "gpus_per_node": "a100:2", "cpus_per_task": None})
    assert (typed.gpus_per_node, typed.cpus_per_task) == (2, 1)


@pytest.mark.parametrize(
    ("params", "partition", "found"),
    [
        ({"cpus_per_task": 2}, LOCAL, None),
        ({"cpus_per_task": 8}, LOCAL, "hydra.launcher.cpus_per_task=8 asks for 8 CPUs on one"),
        (
            {"tasks_per_node": 2, "cpus_per_task": 2},
            LOCAL,
            "hydra.launcher.tasks_per_node=2 x cpus_per_task=2 ask for 4 CPUs on one node, more "
            "than any node of partition debug has (2); lower hydra.launcher.cpus_per_task to at "
            "most 1",
        ),
        ({"tasks_per_node": 3}, LOCAL, "lower hydra.launcher.tasks_per_node to at most 2"),
        ({"nodes": 2}, LOCAL, "hydra.launcher.nodes=2 asks for 2 nodes; a job on partition debug"),
        ({"mem_gb": 24}, LOCAL, "hydra.launcher.mem_gb=24 asks for 24 GB on one node"),
        ({"gpus_per_node": 8}, GPU, "hydra.launcher.gpus_per_node=8 asks for 8 GPUs on one node"),
        ({"gpus_per_node": 4, "timeout_min": 720}, GPU, None),
        ({"gpus_per_node": 1}, LOCAL, None),  # no GPUs at all: sbatch's refusal says so
        ({"mem_gb": 23}, LOCAL, None),
        ({"timeout_min": 721}, GPU, "hydra.launcher.timeout_min=721 is above the time limit"),
        ({"timeout_min": 720, "cpus_per_task": 64, "nodes": 2}, GPU, None),
        # no node listed (nodes that appear on demand): only the time limit can be compared
        ({"cpus_per_task": 1000}, Partition("cloud", ()), None),
        ({"timeout_min": 61}, Partition("cloud", (), max_time_min=60), "is above the time"),
    ],
)
def test_a_request_no_node_can_hold(params: dict, partition: Partition, found: str | None) -> None:
    got = misfit(Request.from_params({**PARAMS, **params}), partition)
    if found is None:
        assert got is None
    else:
        assert got is not None and found in got, got


# ---- pending reasons ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reason",
    [
        "None",
        "Resources",
        "Priority",
        "JobArrayTaskLimit",
        "BeginTime",
        "ReqNodeNotAvail",
        "PartitionDown",
        "PartitionNodeLimit",  # without a node count above the partition's: nodes down
        "JobHeldAdmin",
        "QOSGrpCpuLimit",
        "AssocGrpGRES",
        "QOSMaxCpuPerUserLimit",
        "QOSMaxJobsPerUserLimit",
        "AssociationJobLimit",
    ],
)
def test_reasons_that_lift_by_waiting(reason: str) -> None:
    assert never_starts(reason, "debug") is None
    assert waiting_for(reason)


@pytest.mark.parametrize(
    ("reason", "says"),
    [
        ("PartitionConfig", "more than partition debug allows"),
        ("PartitionTimeLimit", "lower hydra.launcher.timeout_min"),
        ("BadConstraints", "no node of partition debug can satisfy"),
        ("InvalidAccount", "hydra.launcher.account"),
        ("InvalidQOS", "hydra.launcher.qos"),
        (
            "QOSMaxWallDurationPerJobLimit",
            "per-job limit of its QOS; lower hydra.launcher.timeout_min",
        ),
        ("AssocMaxCpuPerJobLimit", "association (user and account); lower hydra.launcher.cpus_per"),
        ("QOSMaxGRESPerJob", "lower hydra.launcher.gpus_per_node"),
        ("QOSMaxMemoryPerNode", "lower hydra.launcher.mem_gb"),
        ("QOSMaxCpuMinutesPerJobLimit", "timeout_min (or the job's size"),
        ("QOSMinGRES", "less than its QOS's minimum; raise hydra.launcher.gpus_per_node"),
        ("QOSMaxBBPerJob", "use another hydra.launcher.qos or account"),
    ],
)
def test_reasons_that_never_lift(reason: str, says: str) -> None:
    why = never_starts(reason, "debug")
    assert why is not None and says in why, why


def test_the_partition_comparison_names_the_key_for_a_reason_about_the_jobs_shape() -> None:
    found = misfit(Request(cpus_per_task=8), LOCAL)
    assert found is not None
    for reason in ("PartitionConfig", "BadConstraints", "PartitionNodeLimit"):
        assert never_starts(reason, "debug", found) == found
    assert never_starts("Resources", "debug", found) is None


# ---- without a cluster ----------------------------------------------------------------------
def test_without_sbatch_a_slurm_sweep_is_one_line(tmp_path: Path) -> None:
    """launcher=slurm where Slurm's commands are missing: Hydra instantiates salt's launcher,
    which says so in one line (no traceback, nothing written but the sweep directory)."""
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent),  # python, without sbatch or scontrol
        "PYTHONPATH": str(SRC),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "salt.train",
            "-m",
            "launcher=slurm",
            "force=true",
            f"log_dir={tmp_path / 'logs'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("salt: error:")]
    assert errors == [
        "salt: error: sbatch not found: launcher=slurm submits with Slurm's sbatch; run on a "
        "machine of the cluster (a login node), or use launcher=submitit_local to run the jobs "
        "here"
    ], out.stderr
