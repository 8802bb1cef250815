#!/usr/bin/env python3
"""Write a private CA and a SuperLink TLS certificate signed by it (offline, `cryptography` only).

    python scripts/generate_certs.py certificates/                      # 127.0.0.1 + localhost
    python scripts/generate_certs.py certificates/ --host superlink.example.org --host 10.0.0.5

Files written into the directory (created if missing):
  ca.crt      the CA certificate: every SuperNode's ``--root-certificates``, the flwr CLI's
              ``root-certificates``, and the SuperLink's ``--ssl-ca-certfile``
  ca.key      the CA's private key (keep it off the SuperNodes; needed only to sign more certs)
  server.pem  the SuperLink's certificate (``--ssl-certfile``), valid for 127.0.0.1, localhost and
              every ``--host`` (a name or an IP address: the address SuperNodes dial must be in it)
  server.key  its private key (``--ssl-keyfile``)

Keys are ECDSA P-256; private keys are written with mode 0600. Existing files are overwritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # unique, order kept
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def generate(out_dir: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem, server.key into ``out_dir``; return their paths."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedserve CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = {
        "ca_cert": out_dir / "ca.crt",
        "ca_key": out_dir / "ca.key",
        "server_cert": out_dir / "server.pem",
        "server_key": out_dir / "server.key",
    }
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca_key"], ca_key)
    paths["server_cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server_key"], server_key)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the PEM files into")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the SuperLink is reached at (repeatable); "
        "127.0.0.1 and localhost are always included",
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out_dir, [*args.host, *DEFAULT_HOSTS], args.days)
    except ValueError as err:
        parser.error(str(err))
    for path in paths.values():
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
