"""The `trainer` node: how long, in which precision, on which devices, how often to save."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from salt.errors import ConfigError
from salt.utils import typed_config as check

# full, bf16 autocast, fp16 autocast (with a GradScaler): the autocast dtype of each
AUTOCAST = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
PRECISIONS = tuple(AUTOCAST)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MONITOR_MODES = ("auto", "min", "max")  # auto: min for a loss, max for any other metric


def devices_setting(devices: Any, where: str = "trainer.devices") -> str | int | list[int]:
    """``trainer.devices`` checked for its form alone ('auto', 'cpu', a process count >= 1 or a
    list of distinct GPU ids): what the GPUs of the machine allow is checked where it runs,
    since a sweep is often composed on a login node without any."""
    if devices in ("auto", "cpu"):
        return devices
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ConfigError(f"{where} must be >= 1, got {devices}")
        return devices
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        ids = list(devices)
        if (
            not ids
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)
            or len(set(ids)) != len(ids)
        ):
            raise ConfigError(f"{where} list must hold distinct GPU ids >= 0, got {ids}")
        return ids
    raise ConfigError(
        f"{where} must be 'cpu', 'auto', a process count or a list of GPU ids, got {devices!r}"
    )


@dataclass
class TrainerConfig:
    max_epochs: int = 20  # -1: no epoch limit (then max_steps ends the run)
    max_steps: int = -1  # stop after this many optimizer steps (-1: no limit)
    precision: str = "32"  # 32 | bf16 | 16 (Lightning's "bf16-mixed", "16-mixed" also read)
    compile: bool | str = False  # torch.compile: true (inductor), false, or a backend's name
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # auto | N | [ids]: several devices run DDP
    fast_dev_run: int = 0  # N > 0: N train and N val batches, nothing written
    gradient_clip_val: float | None = None  # max gradient norm (null: no clipping)
    monitor: str = "auto"  # the validation metric that names checkpoints and picks the best
    monitor_mode: str = "auto"  # auto | min | max: whether its lowest or highest value is best
    ckpt_every_n_steps: int = 1000  # also refresh last.ckpt mid-epoch (0: only per epoch)
    progress_bar: bool = True
    # DDP: how long a rank waits in a collective for the others before the run stops with the
    # rank it waited for named. Longer than any wait of the ranks for one of them (rank 0
    # writing the sample or a checkpoint, a node's first rank copying data.move_files_temp):
    # 30 min, as torch's gloo default and Lightning's; torch's NCCL default (10 min) is short
    # for those. A stuck rank then costs at most this much of the job, not all of it.
    ddp_timeout_s: float = 1800.0

    def check(self, where: str) -> None:
        self.precision = self.precision.lower().replace("-mixed", "").replace("-true", "")
        check.one_of(self.precision, f"{where}.precision", PRECISIONS)
        check.one_of(self.accelerator, f"{where}.accelerator", ACCELERATORS)
        check.one_of(self.monitor_mode, f"{where}.monitor_mode", MONITOR_MODES)
        devices_setting(self.devices, f"{where}.devices")
        if self.max_epochs == -1:
            if self.max_steps <= 0:
                raise ConfigError(
                    f"{where}.max_epochs=-1 (no epoch limit) needs {where}.max_steps > 0, "
                    "else the run would never end"
                )
        else:
            check.positive(self.max_epochs, f"{where}.max_epochs")
        if self.max_steps != -1:
            check.positive(self.max_steps, f"{where}.max_steps")
        check.at_least(self.fast_dev_run, f"{where}.fast_dev_run", 0)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ConfigError(
                f"{where}.gradient_clip_val must be > 0 or null, got {self.gradient_clip_val}"
            )
        check.at_least(self.ckpt_every_n_steps, f"{where}.ckpt_every_n_steps", 0)
        if not self.ddp_timeout_s > 0:
            raise ConfigError(
                f"{where}.ddp_timeout_s must be > 0 (seconds), got {self.ddp_timeout_s}"
            )
        if isinstance(self.compile, str):
            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile not in backends:
                raise ConfigError(
                    f"{where}.compile={self.compile!r}: expected true, false or a torch.compile "
                    f"backend ({', '.join(sorted(backends))})."
                )

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend, None when not compiling."""
        if self.compile is True:
            return "inductor"
        return self.compile or None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of `precision` (None: full precision)."""
        return AUTOCAST[self.precision]


def cpu_autocast_warning(dtype: torch.dtype | None, native: dict[str, bool] | None = None) -> str:
    """A notice for autocast on a CPU that lacks native support for ``dtype`` (then PyTorch
    emulates it, and a step is several times slower than in fp32); empty when there is none.
    ``native``: the CPU's support per dtype name (default: asked of torch)."""
    if dtype is None:
        return ""
    if native is None:
        cpu = torch.cpu
        ask = {
            "bfloat16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
            "float16": ("_is_amx_fp16_supported",),
        }
        # private torch helpers: where a torch lacks them, nothing is claimed
        native = {
            name: any(getattr(cpu, f, lambda: True)() for f in funcs) for name, funcs in ask.items()
        }
    name = str(dtype).removeprefix("torch.")
    if native.get(name, True):
        return ""
    precision = next(k for k, v in AUTOCAST.items() if v is dtype)
    return (
        f"salt: trainer.precision={precision} on a CPU without native {name} support: "
        "PyTorch emulates it and training is typically 2-3x slower than trainer.precision=32"
    )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
