"""Our Hydra launchers (hydra_plugins/lm_saes_launchers), registered with Hydra by hand.

Hydra finds plugins by listing the `hydra_plugins` folders on disk; an editable install (PEP 660, what
scripts/install.sh makes) serves our package through an import hook that such a listing cannot see. Importing
the module registers its configs (`hydra/launcher=lm_saes_grouped|lm_saes_slurm`); `Plugins.register` is
Hydra's own way to add a plugin class by hand. Idempotent, and harmless where Hydra found them itself.
"""

from __future__ import annotations

OUR_LAUNCHERS = ("grouped", "slurm")
"""The hydra/launcher= presets (conf/hydra/launcher/) that need the launchers registered here."""


def register_launchers() -> bool:
    """Whether our launchers are available: an install made before they existed lacks the package until
    `pip install -e .` (scripts/install.sh) runs again; every other command works without it."""
    from hydra.core.plugins import Plugins

    try:
        from hydra_plugins.lm_saes_launchers import GroupedLauncher, GroupedSlurmLauncher
    except ImportError:
        return False
    plugins = Plugins.instance()
    for launcher in (GroupedLauncher, GroupedSlurmLauncher):
        plugins.register(launcher)
    return True
