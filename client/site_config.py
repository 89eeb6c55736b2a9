"""Where a site's config comes from and what it resolves to: the hospital's own folder of
site configs over the packaged ``site_configs/``, composed with Hydra and checked against the
site schema. No torch here, so a typo in a site name or a value is reported at once
(``python -m client --site X``, ``--list``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .site_schema import check_site_config

log = logging.getLogger(__name__)

__all__ = [
    "SITE_CONFIGS_ENV",
    "SiteDataError",
    "compose_site_config",
    "config_roots",
    "packaged_configs",
    "site_sources",
]


class SiteDataError(ValueError):
    """The site's data cannot be used; the message names the file or setting and the problem."""


#: environment variable naming a hospital-owned folder of site configs (like --config-dir)
SITE_CONFIGS_ENV = "MRPRISM_SITE_CONFIGS"


def packaged_configs() -> Path:
    """The site configs shipped with the package (``site_configs/``)."""
    return Path(str(resources.files("site_configs"))).resolve()


def config_roots(config_dir: str | Path | None = None) -> list[Path]:
    """Where site configs are looked up, first match wins: the hospital's own folder
    (``config_dir``, else ``$MRPRISM_SITE_CONFIGS``), then the packaged ``site_configs/``."""
    own = config_dir if config_dir is not None else os.environ.get(SITE_CONFIGS_ENV) or None
    roots = [packaged_configs()]
    if own is not None:
        own_root = Path(own).expanduser().resolve()
        if not own_root.is_dir():
            raise SiteDataError(f"config folder {own_root} does not exist")
        if own_root != roots[0]:
            roots.insert(0, own_root)
    return roots


def _sites_in(root: Path) -> list[str]:
    """Names of the site configs in ``root`` (top-level YAML files with a ``site:`` key)."""
    return [
        path.stem
        for path in sorted(root.glob("*.yaml"))
        if any(line.startswith("site:") for line in path.read_text().splitlines())
    ]


def site_sources(config_dir: str | Path | None = None) -> dict[str, Path]:
    """Every known site and the folder its YAML is taken from (the hospital's own first)."""
    sources: dict[str, Path] = {}
    for root in config_roots(config_dir):
        for name in _sites_in(root):
            sources.setdefault(name, root)
    return dict(sorted(sources.items()))


def compose_site_config(
    site: str, overrides: Sequence[str] = (), config_dir: str | Path | None = None
) -> dict[str, Any]:
    """Resolve ``<site>.yaml`` with Hydra (groups, interpolation, overrides).

    The YAML comes from the hospital's own folder (``config_dir`` or ``$MRPRISM_SITE_CONFIGS``)
    when it is there, else from the packaged ``site_configs/``; the packaged groups (``data``,
    ``privacy``) stay available to it either way, and a site of the same name in both is
    taken from the hospital's folder with a notice.

    Raises:
        SiteDataError: unknown site (the message lists the known ones) or bad override.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    sources = site_sources(config_dir)
    if site not in sources:
        searched = " and ".join(str(root) for root in config_roots(config_dir))
        raise SiteDataError(
            f"unknown site {site!r}: no {site}.yaml in {searched}; known: {list(sources)}"
        )
    root, packaged = sources[site], packaged_configs()
    extra = []
    if root != packaged:  # the hospital's folder, with the packaged groups behind it
        extra = [f"hydra.searchpath=[file://{packaged}]"]
        if site in _sites_in(packaged):
            log.warning("site %s: using %s, not the packaged config", site, root / f"{site}.yaml")
    # inside another Hydra app (simulation.run) the global Hydra is taken: set it aside
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            cfg = compose(config_name=site, overrides=[*overrides, *extra])
    except (HydraException, ValueError) as err:  # bad override, bad YAML, unknown group
        raise SiteDataError(f"site {site!r}: {err}") from err
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)
    try:
        cfg = check_site_config(cfg)  # types and key names, before anything runs
    except ValueError as err:
        raise SiteDataError(f"site {site!r}: {err}") from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SiteDataError(
            f"site {site!r}: {', '.join(missing)} must be set, e.g. "
            f"`python -m client --site {site} {missing[0]}=...`"
        )
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        raise SiteDataError(f"site {site!r}: {err}") from err
