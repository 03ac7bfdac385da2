"""Sweeps on Slurm (``launcher=slurm``): submit through submitit, and explain in one line what
Slurm refuses or can never start, naming the ``hydra.launcher.*`` key to change.

- `salt.slurm.launcher`: hydra-submitit-launcher's SlurmLauncher, checked before submitting and
  watched while it waits (``hydra.launcher._target_`` in conf/hydra/launcher/slurm.yaml);
- `salt.slurm.partition`: what a partition's nodes offer, and whether a request fits;
- `salt.slurm.explain`: sbatch's refusals and the queue's pending reasons, in salt's words.
"""
