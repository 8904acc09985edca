"""The consortium's keys and certificates, made with ``cryptography`` only.

One consortium CA (EC P-384, self-signed, ``path_length=0``: it signs end-entity
certificates only) issues:

- the SuperLink's TLS server certificate (EC P-256, ``serverAuth``, a subjectAltName for
  every name and address the sites dial);
- one identity certificate per site, binding the site id to its Ed25519 identity key (the
  key that signs its secure-aggregation keys, ledgers and checkpoints).

Each site also gets a Flower SuperNode authentication key pair (EC P-384, OpenSSH format:
what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
load). Those keys are not certified by X.509; the CA-signed roster lists them.

Private keys are written with :func:`write_private_key`: mode 0600 from the moment the
file exists, never replacing an existing key unless ``force`` is given. Public files go
through :func:`write_public_file` (mode 0644). Both write atomically.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.common.atomic import atomic_write_bytes

CA_CURVE = ec.SECP384R1()
SERVER_CURVE = ec.SECP256R1()
SUPERNODE_CURVE = ec.SECP384R1()
CA_COMMON_NAME = "medfed consortium CA"
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this long before they are made, so a site whose clock is a little
behind does not reject a fresh certificate."""
MAX_NAME_CHARS = 64  # X.509 upper bound for CN and O
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class ProvisionError(ValueError):
    """Provisioning cannot go on: bad input, or a file that must not be overwritten.

    The message names the option or the file and what to do.
    """


class CertificateError(ValueError):
    """A certificate is missing, unreadable, not issued by the consortium CA, or expired.

    The message names the file (or the certificate) and what is wrong.
    """


def _now() -> datetime:
    return datetime.now(UTC)


def check_consortium_name(consortium: str) -> str:
    """The consortium name, stripped; :class:`ProvisionError` if empty, too long (it goes
    into the certificates' organisation field) or holding control characters."""
    name = consortium.strip() if isinstance(consortium, str) else ""
    if not name:
        raise ProvisionError("--consortium: the consortium name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ProvisionError(
            f"--consortium: the name has {len(name)} characters, at most {MAX_NAME_CHARS}"
        )
    if any(not ch.isprintable() for ch in name):
        raise ProvisionError("--consortium: the name must not hold control characters")
    return name


def check_host(host: str) -> str:
    """A SuperLink host: an IP literal (normalised) or a DNS name (lower-cased);
    :class:`ProvisionError` naming the value otherwise."""
    value = host.strip() if isinstance(host, str) else ""
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ProvisionError(
            f"--server: {host!r} is neither an IP address nor a DNS name "
            "(letters, digits and '-' in dot-separated labels, no port)"
        )
    return name


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _ski(public_key: object) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]


def _validity(ca_cert: x509.Certificate | None, days: int) -> tuple[datetime, datetime]:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ProvisionError(f"--days: must be a whole number of days >= 1, got {days!r}")
    now = _now()
    not_after = now + timedelta(days=days)
    if ca_cert is not None:
        if ca_cert.not_valid_after_utc <= now:
            raise CertificateError(
                f"the consortium CA certificate expired on "
                f"{ca_cert.not_valid_after_utc:%Y-%m-%d}; it cannot issue certificates"
            )
        not_after = min(not_after, ca_cert.not_valid_after_utc)
    return now - CLOCK_SKEW, not_after


def create_ca(consortium: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new consortium CA: an EC P-384 key and its self-signed certificate, valid ``days``.

    The certificate may sign end-entity certificates only (``path_length=0``) and CRLs.
    """
    name = check_consortium_name(consortium)
    key = ec.generate_private_key(CA_CURVE)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    not_before, not_after = _validity(None, days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _consortium_of(ca_cert: x509.Certificate) -> str | None:
    values = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if values else None


def _leaf_builder(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | Ed25519PublicKey,
    ca_cert: x509.Certificate,
    days: int,
    *,
    key_agreement: bool,
) -> x509.CertificateBuilder:
    """An end-entity certificate issued by the CA: not a CA, signing (and, for TLS, key
    agreement) only, with key identifiers that chain it to the CA."""
    not_before, not_after = _validity(ca_cert, days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=key_agreement,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key (EC P-256) and certificate, signed by the CA.

    The subjectAltName holds a DNSName for every name and an IPAddress for every IP
    literal in ``hosts`` (sites check the name they dial against it); CN is the first host.
    """
    checked = [check_host(h) for h in hosts]
    if not checked:
        raise ProvisionError("--server: give at least one host name or address")
    key = ec.generate_private_key(SERVER_CURVE)
    attributes = []
    if consortium := _consortium_of(ca_cert):
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium))
    common_name = checked[0] if len(checked[0]) <= MAX_NAME_CHARS else "medfed SuperLink"
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    alt_names: list[x509.GeneralName] = []
    for host in dict.fromkeys(checked):
        address = _ip(host)
        alt_names.append(x509.IPAddress(address) if address else x509.DNSName(host))
    cert = (
        _leaf_builder(x509.Name(attributes), key.public_key(), ca_cert, days, key_agreement=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def issue_identity_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    site_id: str,
    consortium: str,
    public_key: Ed25519PublicKey,
    days: int,
) -> x509.Certificate:
    """A site's identity certificate: CN=site id, O=consortium, for its Ed25519 public key.

    For signatures only (``digital_signature``), not a CA.
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise ProvisionError(
            f"site {site_id!r}: an identity key must be Ed25519, not {type(public_key).__name__}"
        )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, check_consortium_name(consortium)),
            x509.NameAttribute(NameOID.COMMON_NAME, site_id),
        ]
    )
    return _leaf_builder(subject, public_key, ca_cert, days, key_agreement=False).sign(
        ca_key, hashes.SHA384()
    )


def generate_supernode_key() -> ec.EllipticCurvePrivateKey:
    """A fresh Flower SuperNode authentication key (EC P-384)."""
    return ec.generate_private_key(SUPERNODE_CURVE)


def supernode_private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The SuperNode key in OpenSSH private-key format (unencrypted), as Flower loads it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def supernode_public_openssh(
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, comment: str
) -> str:
    """``ecdsa-sha2-nistp384 AAAA... <comment>``: the SuperNode's public key line."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return f"{line} {comment}" if comment else line


def parse_supernode_public(line: str, where: str) -> ec.EllipticCurvePublicKey:
    """Parse an OpenSSH EC public key line; :class:`ValueError` naming ``where``."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{where}: expected an ECDSA key, got {type(key).__name__}")
    return key


def same_public_key(a: object, b: object) -> bool:
    """Whether two public keys are the same key (compared as SubjectPublicKeyInfo DER)."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)  # type: ignore[attr-defined]


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def refuse_existing(paths: Sequence[Path]) -> None:
    """:class:`ProvisionError` naming the first of ``paths`` that exists (``--force``)."""
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ProvisionError(
                f"{path} already exists; pass --force to overwrite it (nothing was written)"
            )


def write_private_key(path: Path, pem_bytes: bytes, force: bool) -> None:
    """Write a private key, mode 0600 from creation; refuse an existing file unless
    ``force`` (:class:`ProvisionError` naming it and ``--force``)."""
    path = Path(path)
    if not force:
        refuse_existing([path])
    atomic_write_bytes(path, pem_bytes)
    os.chmod(path, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key, roster) atomically, mode 0644."""
    path = Path(path)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _read(path: Path, what: str, error: type[ValueError]) -> bytes:
    """The bytes of ``path``; ``error`` naming ``what`` and the file if it is unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """Read one PEM certificate; :class:`CertificateError` naming the file."""
    path = Path(path)
    data = _read(path, what, CertificateError)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{what} {path} is not a PEM X.509 certificate") from None


def load_ca_certificate(path: Path) -> x509.Certificate:
    """Read the consortium CA certificate and check it is a self-signed CA certificate;
    :class:`CertificateError` naming the file otherwise."""
    path = Path(path)
    cert = load_certificate(path, "CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"CA certificate {path} is not a CA certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"CA certificate {path} is not self-signed") from None
    return cert


def load_ec_private_key(path: Path, what: str = "private key") -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC private key; :class:`ProvisionError` naming the file."""
    path = Path(path)
    data = _read(path, what, ProvisionError)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ProvisionError(f"{what} {path} is encrypted; expected an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ProvisionError(f"{what} {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{what} {path} holds a {type(key).__name__}, not an EC key")
    return key


def verify_certificate_signed_by(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    what: str = "certificate",
    at: datetime | None = None,
) -> None:
    """Check that ``cert`` was issued by ``ca_cert`` (issuer name and signature) and is
    valid now (or ``at``); :class:`CertificateError` naming ``what`` otherwise."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except ValueError:
        raise CertificateError(
            f"{what} was not issued by this consortium's CA (issuer "
            f"{cert.issuer.rfc4514_string()!r}, CA {ca_cert.subject.rfc4514_string()!r})"
        ) from None
    except InvalidSignature:
        raise CertificateError(
            f"{what} is not signed by this consortium's CA (signature does not verify; "
            "it was issued by another CA of the same name, or altered)"
        ) from None
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{what}: cannot verify its signature: {exc}") from None
    when = at or _now()
    if when < cert.not_valid_before_utc:
        raise CertificateError(
            f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock)"
        )
    if when > cert.not_valid_after_utc:
        raise CertificateError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}; re-provision it"
        )
