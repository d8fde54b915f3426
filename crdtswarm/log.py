"""Logging context: a `logging.LoggerAdapter` that prefixes a short node or peer id.

crdtswarm never configures logging; every module logs through
``logging.getLogger(__name__)``, and per-connection messages go through
`ContextLogger` so that ``[3pu2kq7f] dropping connection: ...`` says which peer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["ContextLogger"]


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[context]`` (usually `PublicKey.short`)."""

    def __init__(self, logger: logging.Logger, context: str) -> None:
        super().__init__(logger, {"crdtswarm_context": context})
        self._prefix = f"[{context}] " if context else ""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Add the prefix (and keep the context in ``record.crdtswarm_context``)."""
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return f"{self._prefix}{msg}", kwargs
