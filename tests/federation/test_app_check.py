"""What makes an app (FAB) a site's own code: every Python file identical to the site's,
settings free to differ, nothing else that could run."""

from __future__ import annotations

import io
import zipfile

from client.app_check import app_differences


def _fab(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_only_the_sites_own_python_passes(tmp_path):
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "app.py").write_bytes(b"app = 1\n")
    own = {"client/app.py": b"app = 1\n", ".info/CONTENT": b"listing"}
    settings = {"pyproject.toml": b"[tool.flwr]\nrounds = 9\n", "site_configs/x.yaml": b"a: 1"}
    assert app_differences(_fab({**own, **settings}), tmp_path) == []

    changed = app_differences(_fab({"client/app.py": b"app = 1\nimport os\n"}), tmp_path)
    assert changed == [f"client/app.py: differs from this site's {tmp_path / 'client' / 'app.py'}"]
    assert app_differences(_fab({**own, "evil.py": b"x"}), tmp_path) == [
        "evil.py: not in this site's code"
    ]
    assert app_differences(_fab({**own, "client/fast.so": b"\x7fELF"}), tmp_path) == [
        "client/fast.so: a .so file"
    ]
    assert app_differences(_fab({"../client/app.py": b"app = 1\n"}), tmp_path) == [
        "../client/app.py: a path outside the app"
    ]
    assert app_differences(b"not a zip", tmp_path) == ["the app is not a zip archive"]
