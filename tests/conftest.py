"""Shared fixtures: keep torch and Ray small on the 2-core CI machine."""

import os

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    torch.set_num_threads(1)
    yield
