"""Testing kit: a simulated network, hypothesis strategies and a convergence state machine.

* `SimulatedNetwork`: an in-process network, deterministic given its seed.
* `crdtswarm.testing.strategies`: hypothesis strategies for document operations
  and swarm schedules (partitions, heals, restarts, latency changes).
* `SwarmMachine`: a hypothesis ``RuleBasedStateMachine`` to subclass to
  property-test that an application's replicated documents converge.
* `wait_for_directory`: wait, without sleeping, until members, rows or routes say
  what a test expects.
"""

from crdtswarm.testing.machine import SwarmMachine
from crdtswarm.testing.network import SimulatedNetwork
from crdtswarm.testing.waiting import wait_for_directory

__all__ = ["SimulatedNetwork", "SwarmMachine", "wait_for_directory"]
