"""Fixtures of the speed-lever tests."""

import pytest

from ..helpers import install_fake_liger


@pytest.fixture
def fake_liger(monkeypatch):
    return install_fake_liger(monkeypatch)
