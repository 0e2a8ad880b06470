"""Fixtures of the speed-lever tests (the shared builders are in tests/helpers.py)."""

import pytest

from ..helpers import install_fake_liger


@pytest.fixture
def fake_liger(monkeypatch):
    return install_fake_liger(monkeypatch)
