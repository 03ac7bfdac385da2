"""Building a run from its config: data (staged once per node), loaders, tagger, optimizer and
schedule, the run directory and logger, and the checkpoint it continues from."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from inspect import signature
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from salt import models
from salt.data.build import (
    DataFiles,
    check_class_dict,
    check_no_truth_inputs,
    make_loader,
    resolve_files,
    warn_about_files,
)
from salt.data.class_names import fill_class_names
from salt.data.dataset import BatchLoader
from salt.data.ftag import input_norm, load_yaml_dict
from salt.data.staging import stage, staging_root
from salt.data.workers import loader_options, resolve_num_workers
from salt.errors import StagingError
from salt.provenance import check_clean, collect_metadata, git_state, push_tag, seed_everything
from salt.schema import TrainConfig, read_train_config
from salt.tracking import Logger, NullLogger, build_logger
from salt.training import checkpoint as ckpt
from salt.training.config import TrainerConfig, autocast, cpu_autocast_warning
from salt.training.distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    broadcast_object,
    collective,
    detect_environment,
)
from salt.training.finetune import finetune
from salt.training.kept import Kept
from salt.training.monitor import monitored
from salt.training.optim import Schedule, build_optimizer
from salt.training.run_dir import (
    RUN_COPIES,
    check_log_dir,
    create_run_dir,
    remember_job,
    requeued_run_dir,
    run_copy,
    write_run_files,
)
from salt.training.state import Counters, Run, check_model_config, check_optimizer
from salt.utils.typed_config import as_plain

log = logging.getLogger("salt")


def ranks_sharing_cpus(dist: DistInfo) -> int:
    """Training processes sharing this process's CPUs: Slurm gives each task (srun, submitit)
    its own; ranks started by spawn or torchrun share the node's."""
    launch = detect_environment()
    if launch is None or launch["source"] in ("slurm", "submitit"):
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))


@contextlib.contextmanager
def stage_once_per_node(files: DataFiles, temp_root: str, dist: DistInfo) -> Iterator[DataFiles]:
    """`stage` the data on each node once: its first rank copies (and checks the free space,
    so ranks cannot race for it), the node's other ranks wait and read the same copies. A
    failure on any node is every rank's error. The copies are removed after every rank of the
    node is done with them (on an error, at once: the run is ending)."""
    if not dist.distributed:
        with stage(files, temp_root, progress=dist.is_main) as staged:
            yield staged
        return
    with contextlib.ExitStack() as copies:
        result: DataFiles | str | None = None  # the copies, or the node's error
        if dist.local_rank == 0:
            try:
                result = copies.enter_context(stage(files, temp_root, progress=dist.is_main))
            except StagingError as err:
                result = f"{socket.gethostname()}: {err}"
        node = socket.gethostname()
        # the copies are done (the wait for them is bounded by trainer.ddp_timeout_s)
        gathered = all_gather_object(
            (node, dist.local_rank, result), what="the data staging (the node's first rank)"
        )
        failures = [r for _, _, r in gathered if isinstance(r, str)]
        if failures:
            raise StagingError(failures[0])
        staged = next(r for n, lr, r in gathered if n == node and lr == 0)
        assert isinstance(staged, DataFiles)
        yield staged
        # every rank is done reading before the node's first rank removes them
        barrier("the end of the run (before the staged copies are removed)")


def build_loaders(cfg: TrainConfig, files: DataFiles, dist: DistInfo) -> tuple[BatchLoader, ...]:
    data = cfg.data
    on_gpu = dist.device.type == "cuda"
    options = loader_options(data, on_gpu)
    variables, labels = models.input_variables(cfg.model), models.label_specs(cfg.model)
    check_no_truth_inputs(variables, labels, data.allow_truth_inputs)
    common = {
        "variables": variables,
        "labels": labels,
        "seed": cfg.seed,
        "rank": dist.rank,
        "world_size": dist.world_size,
        "pin_memory": options["pin_memory"],
        "num_workers": resolve_num_workers(
            data.num_workers, on_gpu=on_gpu, world_size=ranks_sharing_cpus(dist)
        ),
    }
    train = make_loader(
        data, files.train, files.norm_dict, num_jets=data.num_train, train=True, **common
    )
    val = make_loader(
        data, files.val, files.norm_dict, num_jets=data.num_val, train=False, **common
    )
    return train, val


def planned_steps(trainer: TrainerConfig, batches_per_epoch: int) -> int:
    """The optimizer steps the run is planned for (the length of the learning-rate cycle)."""
    if trainer.fast_dev_run:
        return trainer.fast_dev_run
    if trainer.max_epochs == -1:
        return trainer.max_steps
    steps = trainer.max_epochs * batches_per_epoch
    return min(steps, trainer.max_steps) if trainer.max_steps > 0 else steps


def data_parallel(tagger: nn.Module, dist: DistInfo) -> nn.Module:
    """The DDP wrapper: gradients are averaged in the backward pass, its only collective. The
    tagger's buffers (class weights) are the same on every rank from the start and never
    change, so they are not broadcast before every forward pass (torch's default), which would
    be a collective in validation too, where ranks may have different numbers of batches."""
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the option (the old name warns there)
    params = signature(ddp).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    with collective("the model's first broadcast (DDP set-up)"):
        return ddp(tagger, device_ids=ids, **{no_sync: False})


def resume_source(cfg: TrainConfig, requeued: Path | None, dist: DistInfo) -> str | Path | None:
    """The checkpoint the run continues from: ``ckpt_path``, or for a requeued job the latest
    of its own run directory."""
    resume_from: str | Path | None = cfg.ckpt_path
    if requeued is not None:
        resume_from = ckpt.latest_checkpoint(requeued / "ckpts") or resume_from
        if dist.is_main:  # the killed attempt's partial writes only hold disk space
            ckpt.remove_temp_files(requeued / "ckpts")
        log.info("salt: requeued job continues %s from %s", requeued, resume_from)
    return resume_from


def setup(
    config: TrainConfig | DictConfig,
    dist: DistInfo,
    resources: contextlib.ExitStack | None = None,
    kept: Kept | None = None,
) -> Run:
    """Build the run; with ``resources``, data staged to ``data.move_files_temp`` stays until
    it closes (without, the files are read in place); ``kept`` learns the run directory and the
    checkpoint the run starts from as soon as they are known (a Ctrl-C during set-up names
    them)."""
    kept = kept if kept is not None else Kept()
    cfg = read_train_config(config)  # once; everything below reads its typed fields
    fast_dev_run = cfg.trainer.fast_dev_run
    state = git_state()
    if not fast_dev_run:
        check_clean(state, cfg.force)
        check_log_dir(cfg.log_dir)  # before the sample, staging or a checkpoint is touched
    # a job requeued by Slurm (preemption, time limit) continues its own run directory, with
    # the dicts its first attempt copied there (an edited original must not change the run)
    requeued = None if fast_dev_run else requeued_run_dir(cfg)
    if requeued is not None:
        for key in RUN_COPIES:
            copy = run_copy(requeued, key, getattr(cfg.data, key))
            if copy is not None:
                setattr(cfg.data, key, str(copy))
    seed_everything(cfg.seed)

    if dist.is_main:
        files = resolve_files(cfg.data)
    barrier("the writing of the sample (rank 0)")  # the sample is written once, by rank 0
    files = source_files = resolve_files(cfg.data)
    fill_class_names(cfg.model.tasks, files.train[0], cfg.data.input_map)
    weighted = [name for name, task in cfg.model.tasks.items() if task.use_class_weights]
    check_class_dict(files, weighted)  # before staging and before the run directory
    if dist.is_main:
        warn_about_files(files, bool(weighted))
    temp_root = staging_root(cfg.data.move_files_temp)
    if temp_root and resources is not None:
        files = resources.enter_context(stage_once_per_node(files, temp_root, dist))
    train_loader, val_loader = build_loaders(cfg, files, dist)

    class_dict = (
        load_yaml_dict(files.class_dict, "class_dict", "data.class_dict")
        if files.class_dict
        else None
    )
    norm = None  # model.edges un-normalises its kinematics as the loader normalised them
    if cfg.model.edges.enabled:
        norm_dict = load_yaml_dict(files.norm_dict, "norm_dict", "data.norm_dict")
        norm = input_norm(norm_dict, cfg.data.input_map)
    tagger = models.build_tagger(cfg.model, class_dict, input_norm=norm).to(dist.device)
    resume_from = resume_source(cfg, requeued, dist)
    # another run's weights for a new run; a resumed one has them in its own checkpoint
    tuned = finetune(tagger, cfg.finetune, dist.device, load=not resume_from)
    if tuned is not None and dist.is_main:
        log.info(tuned.summary())
    monitor = monitored(cfg.trainer.monitor, cfg.trainer.monitor_mode, tagger)
    amp = cfg.trainer.autocast_dtype
    if dist.device.type == "cpu" and dist.is_main and (slow := cpu_autocast_warning(amp)):
        log.warning(slow)
    compile_backend = cfg.trainer.compile_backend
    if compile_backend is not None:
        with autocast(dist.device, amp):
            tagger.compile_for(tagger.layout(dist.device), compile_backend)
    model: nn.Module = tagger
    if dist.world_size > 1:
        model = data_parallel(tagger, dist)

    total_steps = planned_steps(cfg.trainer, len(train_loader))
    trainable = [p for p in tagger.parameters() if p.requires_grad]  # not finetune.freeze's
    optimizer = build_optimizer(trainable, cfg.optimizer)
    scheduler = Schedule(optimizer, cfg.optimizer, total_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp is torch.float16)

    counters = Counters(best_val_loss=monitor.worst, monitor=monitor.name)
    loaded = ckpt.load_checkpoint(resume_from, map_location=dist.device) if resume_from else None
    if loaded is not None:  # before anything is written: a mismatch leaves no run directory
        check_model_config(loaded.get("config"), cfg.model.plain(), Path(resume_from))
        check_optimizer(loaded, cfg.optimizer.name, len(trainable), Path(resume_from))
        kept.saved(Path(resume_from), int(loaded["counters"]["step"]))

    run_dir = None
    logger: Logger = NullLogger()
    if not fast_dev_run:
        if dist.is_main:
            run_dir = requeued or create_run_dir(cfg)
            remember_job(cfg, run_dir)
        run_dir = kept.run_dir = broadcast_object(run_dir, what="the run directory's name")
        if dist.is_main:
            num_params = models.count_parameters(tagger)
            meta = collect_metadata(
                state=state,
                seed=cfg.seed,
                num_params=num_params,
                data_files={
                    "train": {
                        "path": [str(p) for p in source_files.train],
                        "num_jets": train_loader.dataset.num_jets,
                    },
                    "val": {
                        "path": [str(p) for p in source_files.val],
                        "num_jets": val_loader.dataset.num_jets,
                    },
                    # the originals; config.yaml names the run directory's copies
                    **{
                        key: {"path": str(path), "copy": RUN_COPIES[key]}
                        for key, path in (
                            ("norm_dict", source_files.norm_dict),
                            ("class_dict", source_files.class_dict),
                        )
                        if path is not None
                    },
                },
                extra={
                    "resumed_from": str(resume_from) if resume_from else None,
                    "finetuned_from": tuned.metadata(cfg.finetune) if tuned else None,
                    "world_size": dist.world_size,
                },
            )
            write_run_files(run_dir, cfg, meta, source_files)
            logger = build_logger(
                cfg.logger,
                run_dir,
                run_name=run_dir.name,
                resume_state=(loaded or {}).get("logger"),
            )
            logger.log_hyperparams(as_plain(cfg))
            logger.log_metadata({"git_commit": state.commit, "num_params": num_params})
            # the files a remote record needs to make sense of the run (comet: as assets);
            # written by write_run_files above, free of secrets (no key is ever in the config)
            run_files = [run_dir / "config.yaml", *(run_copy(run_dir, k) for k in RUN_COPIES)]
            logger.log_files([p for p in run_files if p is not None])
            if cfg.tag and requeued is None:  # a requeued job tagged on its first start
                push_tag(state, run_dir.name, cfg.tag_remote, force=cfg.force)
            log.info("salt: run directory %s (%d parameters)", run_dir, num_params)

    run = Run(
        cfg,
        dist,
        model,
        tagger,
        optimizer,
        scheduler,
        scaler,
        train_loader,
        val_loader,
        counters,
        logger,
        run_dir,
        total_steps,
        amp,
        monitor,
        kept=kept,
    )
    if loaded is not None:
        run.load_state_dict(loaded, Path(resume_from))
    return run
