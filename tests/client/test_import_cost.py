"""The ClientApp stays cheap to import: each Flower message starts a fresh process.

In the Deployment Engine every message a SuperNode receives runs in a new
``flwr-clientapp`` process that imports :mod:`medfed.client.app`. torch, Opacus,
scikit-learn, pandas, pydicom and SciPy cost seconds of CPU to import, and most messages
(the secure-aggregation stages) need none of them. Each check runs in a subprocess,
since this test process has long imported them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "opacus", "sklearn", "pandas", "pydicom", "scipy")
REPO = Path(__file__).resolve().parents[2]

REPORT = f"""
import json as _json, sys as _sys
print(_json.dumps(sorted(m for m in {HEAVY!r} if m in _sys.modules)))
"""

# One medfed secure-aggregation setup message, through the whole ClientApp (gate + mod),
# for roster id 1 in the simulation layout (``<data-root>/site-0``, ``roster.json``).
SETUP = """
import sys
from pathlib import Path

from flwr.app import Context, RecordDict

import medfed.client.app
from medfed.common.config import SIM_IDENTITY_NAME, SIM_ROSTER_NAME
from medfed.common.secagg import wire
from medfed.common.secagg.identity import save_identity, simulation_roster
from medfed.common.secagg.protocol import ProtocolConfig
from medfed.common.secagg.quantize import QuantParams
from tests.client.test_secagg_mod import (
    CLIP, DIM, FLOWER_IDS, MAX_WEIGHT, ROSTER_IDS, RUN, THRESHOLD, to_node
)

root = Path(sys.argv[1])
roster, keys = simulation_roster(ROSTER_IDS)
roster.save(root / SIM_ROSTER_NAME)
save_identity(root / "site-0" / SIM_IDENTITY_NAME, keys[1])
config = ProtocolConfig(
    RUN, 1, THRESHOLD, DIM, QuantParams.auto(len(ROSTER_IDS), MAX_WEIGHT, CLIP),
    frozenset(ROSTER_IDS),
)
context = Context(
    run_id=RUN,
    node_id=FLOWER_IDS[1],
    node_config={"partition-id": 0},
    state=RecordDict(),
    run_config={"data-root": str(root), "secure-agg": "medfed"},
)
reply = medfed.client.app.app(to_node(wire.to_recorddict(config), FLOWER_IDS[1]), context)
assert not reply.has_error(), reply.error.reason
assert wire.from_recorddict(reply.content, expect=wire.STAGE_KEYS).node_id == 1
"""


def heavy_modules_after(code: str, *args: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code + REPORT, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_client_app_imports_no_heavy_module():
    code = "import medfed.client.app\napp = medfed.client.app.app"
    assert heavy_modules_after(code) == []


def test_secure_aggregation_modules_import_no_heavy_module():
    code = "import medfed.client.secagg_mod, medfed.client.site_identity, medfed.client.site"
    assert heavy_modules_after(code) == []


def test_secure_aggregation_setup_through_the_client_app_stays_light(tmp_path):
    assert heavy_modules_after(SETUP, str(tmp_path)) == []
