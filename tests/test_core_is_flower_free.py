"""mrprism_core must never import Flower (DESIGN.md: import direction)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_every_core_module_does_not_load_flower():
    code = (
        "import sys, pkgutil, importlib, mrprism_core\n"
        "for m in pkgutil.walk_packages(mrprism_core.__path__, 'mrprism_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "loaded = sorted(n for n in sys.modules if n == 'flwr' or n.startswith('flwr.'))\n"
        "print(len(loaded)); assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
