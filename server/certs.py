"""``python -m server.certs DIR --host coordinator.example.org``: a private CA and a SuperLink
certificate for trials and closed pilots.

Writes ``ca.crt`` (give it to every hospital: ``supernode.root_certificates``), ``ca.key``
(keep it offline), ``server.pem`` and ``server.key`` (the SuperLink's ``--ssl-certfile`` and
``--ssl-keyfile``). The server certificate always also names ``localhost`` and ``127.0.0.1``:
the SuperLink's own ServerApp executor connects to it on loopback and checks the certificate.
In production use certificates from the hospital's or coordinator's own PKI instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mrprism_core.checkpoint import atomic_write_bytes
from mrprism_core.cli_types import positive_int

__all__ = ["make_certificates"]

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK]):  # ordered, without duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certificates(out_dir: str | Path, hosts: Sequence[str] = (), days: int = 365) -> Path:
    """Create ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` in ``out_dir``.

    Refuses to overwrite an existing CA: hospitals already trust it.
    """
    out = Path(out_dir)
    if (out / "ca.crt").exists():
        raise FileExistsError(f"{out / 'ca.crt'} exists; remove it or choose another directory")
    now = dt.datetime.now(dt.timezone.utc)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("MrPrism-FL federation CA"))
        .issuer_name(_name("MrPrism-FL federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    atomic_write_bytes(out / "ca.key", _pem_key(ca_key))
    atomic_write_bytes(out / "server.key", _pem_key(server_key))
    for key_file in ("ca.key", "server.key"):
        os.chmod(out / key_file, 0o600)
    atomic_write_bytes(out / "server.pem", server_cert.public_bytes(pem))
    atomic_write_bytes(out / "ca.crt", ca_cert.public_bytes(pem))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.certs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="directory to write ca.crt, ca.key, server.pem, server.key")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="DNS name or IP address the hospitals use to reach the SuperLink (repeatable)",
    )
    parser.add_argument(
        "--days", type=positive_int, default=365, help="validity in days (default 365)"
    )
    args = parser.parse_args(argv)
    try:
        out = make_certificates(args.out_dir, args.host, args.days)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/ca.crt ca.key server.pem server.key")
    print(
        "SuperLink: flower-superlink --ssl-ca-certfile {0}/ca.crt --ssl-certfile {0}/server.pem "
        "--ssl-keyfile {0}/server.key ...".format(out.resolve())
    )
    print("hospitals:  supernode.insecure=false supernode.root_certificates=/path/to/ca.crt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
