"""Testing kit: a simulated network, hypothesis strategies and a convergence state machine.

* `SimulatedNetwork`: an in-process network, deterministic given its seed.
* `crdtswarm.testing.strategies`: hypothesis strategies for document operations
  and swarm schedules (partitions, heals, restarts, latency changes).
* `SwarmMachine`: a hypothesis ``RuleBasedStateMachine`` to subclass to
  property-test that an application's replicated documents converge.
"""

from crdtswarm.testing.machine import SwarmMachine
from crdtswarm.testing.network import SimulatedNetwork

__all__ = ["SimulatedNetwork", "SwarmMachine"]
