"""A site runs only the app it installed itself.

In Flower 1.41 a submitted run ships its app (a FAB, a zip of the project) to every SuperNode,
which installs it and runs its ClientApp as the site's user; whoever can submit a run (anyone
who reaches the SuperLink's port with its CA certificate) could otherwise run code at every
site. :func:`app_differences` compares a FAB with the site's own checkout: each Python file must
be byte-identical to the site's file at the same path, and nothing else that could run (no
compiled module, no other file type) may come with it. Settings (``pyproject.toml``'s run
config, YAML) may differ. ``client/supernode_launch.py`` refuses a differing app through
Flower's own app-verification reply.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

__all__ = ["PASSIVE_SUFFIXES", "app_differences"]

#: Files an app may bring that differ from the site's: read as settings, never executed.
PASSIVE_SUFFIXES = (".toml", ".yaml", ".yml", ".md", ".txt", ".json")
#: Flower's own listing of the FAB's files.
_FAB_INFO = ".info/CONTENT"


def app_differences(fab_content: bytes, root: Path) -> list[str]:
    """The FAB members that keep it from being the site's own app (empty: it is), each with
    the reason. ``root`` is the site's checkout (the folder holding ``pyproject.toml``)."""
    problems = []
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab_content))
    except zipfile.BadZipFile:
        return ["the app is not a zip archive"]
    with archive:
        for name in archive.namelist():
            path = PurePosixPath(name)
            if name.endswith("/") or name == _FAB_INFO:
                continue
            if path.is_absolute() or ".." in path.parts:
                problems.append(f"{name}: a path outside the app")
            elif path.suffix == ".py":
                local = root.joinpath(*path.parts)
                if not local.is_file():
                    problems.append(f"{name}: not in this site's code")
                elif local.read_bytes() != archive.read(name):
                    problems.append(f"{name}: differs from this site's {local}")
            elif path.suffix not in PASSIVE_SUFFIXES:
                problems.append(f"{name}: a {path.suffix or 'suffix-less'} file")
    return problems
