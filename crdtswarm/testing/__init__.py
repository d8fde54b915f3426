"""Helpers for testing code built on crdtswarm: a simulated in-process network."""

from crdtswarm.testing.network import SimulatedNetwork

__all__ = ["SimulatedNetwork"]
