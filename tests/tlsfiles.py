"""Throw-away certificates for TLS tests, made with the ``openssl`` command.

EC P-256 keys (fast to generate), PEM everywhere: Python's ``ssl`` reads PEM,
and so does Kafka (``ssl.keystore.type=PEM``, ``ssl.truststore.type=PEM``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA that can sign server and client certificates."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class KeyPair:
    """A certificate signed by a CA, with its key (encrypted when ``password`` is set).

    ``bundle`` holds the key, then the certificate: Kafka's PEM keystore format.
    """

    cert: Path
    key: Path
    bundle: Path
    password: str | None


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    result = subprocess.run(
        [openssl, *args], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _new_key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )


def make_ca(folder: Path, name: str) -> CertificateAuthority:
    """A new CA whose files are ``<name>.pem`` and ``<name>.key`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(folder / f"{name}.pem", folder / f"{name}.key")
    _new_key(ca.key)
    _openssl(
        "req", "-x509", "-new", "-key", str(ca.key), "-out", str(ca.cert), "-days", _DAYS,
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return ca


def issue(
    ca: CertificateAuthority,
    folder: Path,
    name: str,
    *,
    hosts: tuple[str, ...] = (),
    password: str | None = None,
) -> KeyPair:
    """A certificate for ``name`` signed by ``ca``: a server one when ``hosts`` (its
    subjectAltNames: IP addresses or DNS names) are given, else a client one."""
    plain_key = folder / f"{name}.plain.key"
    csr = folder / f"{name}.csr"
    cert = folder / f"{name}.pem"
    _new_key(plain_key)
    _openssl("req", "-new", "-key", str(plain_key), "-out", str(csr), "-subj", f"/CN={name}")
    extensions = folder / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature"]
    if hosts:
        alt = ",".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in hosts)
        lines += ["extendedKeyUsage=serverAuth", f"subjectAltName={alt}"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(cert), "-days", _DAYS, "-extfile", str(extensions),
    )  # fmt: skip
    key = plain_key
    if password is not None:
        key = folder / f"{name}.key"
        _openssl(
            "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", str(plain_key), "-out", str(key),
            "-passout", f"pass:{password}",
        )  # fmt: skip
    bundle = folder / f"{name}.bundle.pem"
    bundle.write_text(key.read_text() + cert.read_text())
    return KeyPair(cert, key, bundle, password)
