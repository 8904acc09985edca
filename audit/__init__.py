"""Privacy-budget audits: verify signed ledgers and round records, report, audit empirically."""
