"""The files of a consortium's PKI folder and bundles, and the checks on their names.

Shared by :mod:`medfed.deploy.provision` (which writes them) and
:mod:`medfed.deploy.bundles` (which checks a bundle before a site or the coordinator
starts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfed.deploy.pki import ProvisionError, check_host
from medfed.server.round_log import COORDINATOR_CERT_NAME, COORDINATOR_KEY_NAME

DEFAULT_PORT = 9092
DEFAULT_DAYS = 825
MIN_SITES = 2  # secure aggregation needs at least two sites

CA_DIR = "ca"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
ROSTER_NAME = "roster.json"
CONSORTIUM_NAME = "consortium.json"
SERVER_DIR = "server"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"
SERVER_INFO = "server.json"
# The coordinator's Ed25519 key that signs its round records, and its CA-issued
# certificate: the ServerApp copies the certificate found beside the key into --out.
COORDINATOR_KEY = COORDINATOR_KEY_NAME
COORDINATOR_CERT = COORDINATOR_CERT_NAME
COORDINATOR_SUBJECT = "medfed coordinator"
"""CN of the coordinator's certificate; has a space, so no site id can take it."""
SITES_DIR = "sites"
IDENTITY_KEY = "identity.key"
IDENTITY_CERT = "identity.pem"
SUPERNODE_KEY = "supernode.key"
SUPERNODE_PUB = "supernode.pub"
BUNDLE_INFO = "bundle.json"

SITE_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_SITE_ID = 64


class BundleError(ValueError):
    """A site or server bundle is incomplete, unsafe or inconsistent; the message names
    the file and what is wrong."""


# -- input checks ---------------------------------------------------------------------


def check_site_id(site_id: str) -> str:
    """A site id: 1-64 letters, digits, '.', '_', '-' (not '.' or '..');
    :class:`ProvisionError` naming it otherwise."""
    if (
        not isinstance(site_id, str)
        or not 1 <= len(site_id) <= MAX_SITE_ID
        or not SITE_ID_RE.match(site_id)
        or site_id in (".", "..")
    ):
        raise ProvisionError(
            f"--site: invalid site id {site_id!r}: use 1-{MAX_SITE_ID} letters, digits, "
            "'.', '_' or '-'"
        )
    return site_id


def check_site_ids(site_ids: Sequence[str]) -> list[str]:
    """Valid, unique site ids, at least :data:`MIN_SITES`."""
    ids = [check_site_id(s) for s in site_ids]
    seen: set[str] = set()
    for site_id in ids:
        if site_id in seen:
            raise ProvisionError(f"--site: site id {site_id!r} is given twice")
        seen.add(site_id)
    if len(ids) < MIN_SITES:
        raise ProvisionError(
            f"--site: give at least {MIN_SITES} sites (secure aggregation needs two or more), "
            f"got {len(ids)}"
        )
    return ids


def check_hosts(hosts: Sequence[str]) -> list[str]:
    """Valid SuperLink hosts (DNS names or IP literals), duplicates dropped, at least one."""
    checked = list(dict.fromkeys(check_host(h) for h in hosts if h.strip()))
    if not checked:
        raise ProvisionError("--server: give at least one host name or IP address")
    return checked


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProvisionError(f"--port: must be 1-65535, got {port!r}")
    return port


def superlink_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_json(path: Path, error: type[ValueError], what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise error(f"{what} {path}: expected a JSON object")
    return obj
