"""Keys of the config records that the coordinator and the sites exchange.

A site's replies carry only aggregates: its own id, budget figures, counts and metrics
over at least the minimum cohort; never a patient-level value.
"""

ROUND_KEY = "server-round"
SITE_ID_KEY = "site-id"
ACCEPT_KEY = "accept"
REASON_KEY = "reason"
EPSILON_KEY = "epsilon"
EPSILON_SPENT_KEY = "epsilon-spent"
EPSILON_AFTER_KEY = "epsilon-after"
EPSILON_BUDGET_KEY = "epsilon-budget"
NOISE_KEY = "noise-multiplier"
RECORDS_USED_KEY = "records-used"
RECORDS_SKIPPED_KEY = "records-skipped"
SUPPRESSED_KEY = "suppressed"
SECAGG_ID_KEY = "secagg-id"
LEDGER_LENGTH_KEY = "ledger-length"
LEDGER_HEAD_KEY = "ledger-head"
LEDGER_ENTRY_KEY = "ledger-entry"
MODEL_IN_KEY = "model-sha256-in"
# Per-subgroup evaluation (one JSON string; see medfed.client.fairness for its shape).
FAIRNESS_KEY = "fairness"
