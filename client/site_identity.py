"""Where a site finds its identity key and the consortium roster for secure aggregation.

The roster is the trust anchor of medfed's secure aggregation: a site checks every key
bundle the coordinator relays against it, so it must never come from the coordinator.

- **Deployment** (the SuperNode's node config has ``data-dir``): the node config names
  both files, ``identity-key`` (the site's Ed25519 private key, PKCS8 PEM) and
  ``roster`` (the consortium roster JSON), which the site's IT keeps with its own
  configuration.
- **Simulation** (the node config has only ``partition-id``): ``medfed simulate`` writes
  fresh identities for every run, each site's key as ``site-identity.pem`` in its data
  directory and the roster as ``roster.json`` in the data root (or where the run
  config's ``secagg-roster`` says).

The site's id in the protocol is the roster entry whose public key matches its identity
key, so the node config never needs to repeat it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.common.config import SIM_IDENTITY_NAME
from medfed.common.secagg.identity import Roster, load_identity, public_key_bytes


class IdentityConfigError(ValueError):
    """The site cannot find or use its identity key or roster; the message says which."""


@dataclass(frozen=True)
class SiteIdentity:
    """A site's protocol id, identity key and the roster it trusts."""

    node_id: int
    private_key: Ed25519PrivateKey
    roster: Roster

    @property
    def name(self) -> str:
        return self.roster.describe(self.node_id)


def identity_paths(
    node_config: Mapping[str, Any], data_dir: Path, simulation_roster: Path
) -> tuple[Path, Path]:
    """(identity key, roster) paths for this node; see the module docstring.

    ``simulation_roster`` (from the run config) is used only in the simulation layout."""
    if "data-dir" in node_config:
        missing = [k for k in ("identity-key", "roster") if k not in node_config]
        if missing:
            raise IdentityConfigError(
                "medfed secure aggregation needs the site's identity key and the consortium "
                f"roster: node config lacks {', '.join(repr(k) for k in missing)}"
            )
        return Path(str(node_config["identity-key"])), Path(str(node_config["roster"]))
    return data_dir / SIM_IDENTITY_NAME, simulation_roster


def load_site_identity(
    key_path: Path, roster_path: Path, ca_path: Path | None = None
) -> SiteIdentity:
    """Load the key and the roster and find this site's entry in it.

    With ``ca_path`` (a deployment: node config ``ca-cert``) the roster must carry a
    valid signature of that consortium CA, so an edited roster file is refused."""
    try:
        private_key = load_identity(key_path)
        if ca_path is None:
            roster = Roster.load(roster_path)
        else:
            from medfed.deploy.pki import load_ca_certificate
            from medfed.deploy.roster import load_signed_roster

            signed = load_signed_roster(roster_path, load_ca_certificate(ca_path))
            roster = signed.secagg_roster()
    except (OSError, ValueError) as exc:
        raise IdentityConfigError(f"secure-aggregation identity: {exc}") from None
    try:
        node_id = roster.node_of(public_key_bytes(private_key))
    except ValueError as exc:
        raise IdentityConfigError(
            f"secure-aggregation identity: the key in {key_path} is not in the roster "
            f"{roster_path} ({exc})"
        ) from None
    return SiteIdentity(node_id, private_key, roster)
