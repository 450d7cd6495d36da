"""Shared fixtures of the evaluation tests."""

from __future__ import annotations

import pytest
from eval_models import Planted, planted_false_negative


@pytest.fixture(scope="session")
def planted() -> Planted:
    return planted_false_negative()
