"""The example plugin under test, through streamvisor.testing's fixtures."""

import pytest


@pytest.fixture
def streamvisor_toml():
    return """
[plugins.example]
greeting = "Howdy"
"""
