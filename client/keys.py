"""``python -m client.keys DIR --site NAME``: this hospital's SuperNode key pair.

Writes ``DIR/NAME`` (private key: stays at the hospital, ``supernode.auth_private_key``) and
``DIR/NAME.pub`` (public key: send it to the coordinator, who registers it with
``flwr supernode register NAME.pub <connection>``). With ``--enable-supernode-auth`` the
SuperLink refuses every SuperNode whose key was not registered. The keys are ECDSA P-384 in
OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mrprism_core.checkpoint import atomic_write_bytes

__all__ = ["make_site_keys"]


def make_site_keys(out_dir: str | Path, site: str) -> tuple[Path, Path]:
    """Create ``out_dir/site`` and ``out_dir/site.pub``; never overwrites a key."""
    private_path = Path(out_dir) / site
    public_path = private_path.with_name(site + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; a site keeps its key (remove it to rotate)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write_bytes(private_path, private)
    os.chmod(private_path, 0o600)
    atomic_write_bytes(public_path, public + f" {site}\n".encode())
    return private_path, public_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="directory for the key pair")
    parser.add_argument("--site", required=True, help="site name (file name and key comment)")
    args = parser.parse_args(argv)
    try:
        private, public = make_site_keys(args.out_dir, args.site)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"private key: {private}  (keep it here: supernode.auth_private_key={private})")
    print(f"public key:  {public}  (send it to the coordinator)")
    print(f"coordinator: flwr supernode register {public.name} <connection>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
