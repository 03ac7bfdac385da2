"""What a stopped run keeps, and the one line that says so.

A run stopped by a signal (Slurm's cancel, Ctrl-C) ends with one line naming its last
complete checkpoint and the command that continues from it. `Kept` follows that checkpoint
as the run goes: the one it started from (``ckpt_path``, ``resume``, a requeue), then each one
it writes. A second Ctrl-C may cut a checkpoint write short; the file under its final name is
then the previous complete one (salt.utils.atomic), which is what `Kept` still names.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Kept:
    """The run's directory and its last complete checkpoint (the same on every DDP rank:
    rank 0 writes, every rank learns that the write succeeded)."""

    run_dir: Path | None = None  # None: not made yet, or fast_dev_run (nothing is written)
    checkpoint: Path | None = None
    checkpoint_step: int | None = None
    saving: bool = False  # a checkpoint write is under way

    def saved(self, path: Path, step: int) -> None:
        self.checkpoint, self.checkpoint_step, self.saving = path, step, False

    def how_to_continue(self) -> str:
        if self.checkpoint is None:
            if self.run_dir is None:
                return "nothing was saved: start the run again"
            return f"nothing was saved (no checkpoint yet): remove {self.run_dir} and start again"
        run_dir = self.checkpoint.parent.parent  # <run dir>/ckpts/<file>
        if self.checkpoint.parent.name == "ckpts" and (run_dir / "config.yaml").is_file():
            how = f"resume={run_dir}"
        else:  # a checkpoint file outside a run directory
            how = f"ckpt_path={self.checkpoint}"
        return (
            f"the last complete checkpoint is {self.checkpoint} (step {self.checkpoint_step}): "
            f"continue with {how}"
        )

    def stopped(self, signum: int, step: int) -> str:
        """After the stop's checkpoint (the first signal)."""
        where = f"at step {step}" if step else "before the first step"
        name = signal.Signals(signum).name
        return f"stopped by signal {signum} ({name}) {where}; {self.how_to_continue()}"

    def interrupted(self, step: int | None, again: bool) -> str:
        """A Ctrl-C that cut the run short (a second one, or one before the stop request)."""
        what = "interrupted again" if again else "interrupted"
        if step is None:
            where = "during set-up"
        elif self.saving:
            where = f"at step {step} during the checkpoint write (dropped)"
        elif again and self.checkpoint_step != step:
            where = f"at step {step} before the checkpoint was written"
        else:
            where = f"at step {step}"
        return f"{what} {where}; {self.how_to_continue()}"
