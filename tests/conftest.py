from __future__ import annotations

from pathlib import Path

import pytest

from crdtswarm.identity import Identity

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def alice() -> Identity:
    return Identity(bytes(range(32)))


@pytest.fixture
def bob() -> Identity:
    return Identity(bytes(range(1, 33)))


@pytest.fixture
def carol() -> Identity:
    return Identity(bytes(range(2, 34)))
