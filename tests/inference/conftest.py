"""Fixtures of the inference tests: the tabular ones live in tabular_fixtures.py."""

from tests.inference.tabular_fixtures import (  # noqa: F401 (fixtures for pytest)
    run_copy,
    site_data,
    synthetic_site,
    trained_run,
)
