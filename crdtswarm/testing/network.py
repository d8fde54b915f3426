"""`SimulatedNetwork`: an in-process network of nodes that reach each other by key.

```python
net = SimulatedNetwork(seed=1)
async with Swarm(transports=[net.transport()]) as node: ...
net.set_latency(a_key, b_key, 0.040)        # one-way seconds, both directions
net.block(a_key, b_key); net.unblock(a_key, b_key)
net.partition([a_key, b_key], [c_key]); net.heal()
net.tap(lambda src, dst, data: ...)         # every message the network carries
```

The machinery lives in `crdtswarm.transport.memory`; this is its face for tests,
examples and simulations.
"""

from __future__ import annotations

from crdtswarm.transport.memory import MemoryNetwork

__all__ = ["SimulatedNetwork"]


class SimulatedNetwork(MemoryNetwork):
    """An in-process network, deterministic given its seed.

    Each node gets a transport from `transport` and, once it serves under its public
    key, is dialled by that key. Paths between nodes have a latency (and optional
    jitter) and can be blocked or partitioned; a tap sees every message. See
    `crdtswarm.transport.memory.MemoryNetwork` for every method and argument.

    Args:
        seed: seeds every random choice; the same seed and the same events give the
            same run.
        latency: default one-way latency between two nodes, in seconds (default 0.0).
        jitter: default extra one-way delay per message, uniform in ``[0, jitter)``
            seconds (default 0.0).
        capacity: messages one direction of a link holds before ``send`` waits
            (default 64).
        max_message_size: default largest message in bytes (default 1 MiB).
    """
