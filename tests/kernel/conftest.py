"""Fixtures of the kernel tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel.harness import Harness, loaded_harness


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """One loaded program per test module (the parser, egress and capture-replay tests)."""
    yield from loaded_harness()
