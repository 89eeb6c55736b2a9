"""Where a site's Unix sockets (its worker's, its ClientApp fork server's) live.

In the site's state directory when the path fits a Unix socket address (about 107 bytes);
otherwise in one owner-only folder under the temporary directory whose name derives from the
state directory. A site that was SIGKILLed therefore leaves at most that one folder, which its
restart takes over and removes when it stops, instead of a new random folder per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Longest socket path we bind: ``sun_path`` holds 108 bytes on Linux, 104 on macOS.
MAX_SOCKET_PATH_BYTES = 99

#: Prefix of the folders under the temporary directory (one per state directory and user).
FOLDER_PREFIX = "mrprism-sockets-"


def socket_folder(state_dir: Path, temp_root: Path | None = None) -> Path:
    """The folder for the sockets of the site in ``state_dir``, under ``temp_root`` (default:
    this process's temporary directory): the same on every start of that site."""
    digest = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) if temp_root is None else temp_root
    return root / f"{FOLDER_PREFIX}{os.getuid()}-{digest}"


def _is_ours(folder: Path) -> bool:
    """A real folder (no link) of this user that nobody else may enter: safe to bind in."""
    info = os.lstat(folder)
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and stat.S_IMODE(info.st_mode) & 0o077 == 0
    )


def _owner_only_folder(state_dir: Path) -> Path:
    """The site's socket folder, made if missing. A folder of that name that another user
    owns, or that others may enter, is not used (whoever can write to it could put their own
    socket in the worker's place): a fresh random one is."""
    folder = socket_folder(state_dir)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        if not _is_ours(folder):
            print(
                f"notice: {folder} is not an owner-only folder of this user; the site's "
                "sockets go to a fresh temporary folder instead",
                file=sys.stderr,
            )
            return Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    return folder


@contextlib.contextmanager
def socket_path(state_dir: Path, name: str) -> Iterator[Path]:
    """Where the socket ``name`` of the site in ``state_dir`` is bound; the socket file, and
    the temporary folder once it is empty, are removed when the context ends."""
    path = state_dir / name
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        yield path
        return
    folder = _owner_only_folder(state_dir)
    path = folder / name
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the site's other socket may still be in it
            folder.rmdir()
