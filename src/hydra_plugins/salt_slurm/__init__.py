"""salt's Slurm launcher, where Hydra looks for launchers.

Hydra instantiates a launcher only from a class defined in the ``hydra_plugins`` namespace
package, and reads the plugins' configs from what their modules register when it scans them.
The launcher itself is `salt.slurm.launcher.SlurmLauncher`; conf/hydra/launcher/slurm.yaml
starts from the config registered here (``salt_slurm``).
"""

from hydra.core.config_store import ConfigStore

from salt.slurm import launcher


class SlurmLauncher(launcher.SlurmLauncher):
    """``hydra.launcher._target_`` of ``launcher=slurm`` (`launcher.SlurmLauncherConf`)."""


ConfigStore.instance().store(
    group="hydra/launcher", name="salt_slurm", node=launcher.SlurmLauncherConf, provider="salt"
)
