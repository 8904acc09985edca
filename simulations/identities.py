"""Fresh secure-aggregation identities for one simulated federation.

Before every simulated run, each site without one gets an Ed25519 identity key in its
data directory (``site-identity.pem``, mode 0600; an existing key is kept, since it has
signed the site's ledger entries) and the roster of their public keys is written where
the run config's ``secagg-roster`` points (``<data-root>/roster.json`` by default). Roster
ids are the sites' partition ids, names their policy ``site_id``. In a deployment the
consortium issues identities instead; nothing here is used there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.client.policy import POLICY_NAME, load_policy
from medfed.common.config import SIM_IDENTITY_NAME
from medfed.common.secagg.identity import (
    IdentityError,
    Roster,
    generate_identity,
    load_identity,
    public_key_bytes,
    save_identity,
)


def write_simulation_identities(site_dirs: Sequence[Path], roster_path: Path) -> Roster:
    """Identity keys for ``site_dirs`` (partition i = ``site_dirs[i]``) and their roster.

    A site's existing key is reused; a missing or unreadable one is replaced by a new key.
    """
    keys, names = {}, {}
    for partition, site_dir in enumerate(site_dirs):
        keys[partition] = public_key_bytes(_identity(Path(site_dir) / SIM_IDENTITY_NAME))
        policy_path = Path(site_dir) / POLICY_NAME
        if policy_path.is_file():
            names[partition] = load_policy(policy_path).site_id
    if len(set(names.values())) != len(names):
        names = {}  # duplicate site ids: the roster then names sites by partition only
    roster = Roster(keys, names)
    roster_path.parent.mkdir(parents=True, exist_ok=True)
    roster.save(roster_path)
    return roster


def _identity(path: Path) -> Ed25519PrivateKey:
    try:
        return load_identity(path)
    except IdentityError:
        key = generate_identity()
        save_identity(path, key)
        return key
