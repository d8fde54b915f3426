"""Transports: ways to reach other nodes, each producing `Link`s."""

from crdtswarm.transport.abc import Link, LinkAttribute, LinkHandler, Transport

__all__ = ["Link", "LinkAttribute", "LinkHandler", "Transport"]
