"""`SwarmMachine`: a hypothesis state machine for property-testing convergence.

Subclass it in your tests to check that your application's replicated documents
converge on a `crdtswarm.testing.SimulatedNetwork`, whatever the interleaving of
edits, partitions, heals, restarts and latency changes::

    from crdtswarm.testing.machine import SwarmMachine

    class NotesMachine(SwarmMachine):
        NODES = 3

    TestNotes = NotesMachine.TestCase

Each rule runs on real `Swarm` nodes in an event loop thread (an anyio blocking
portal). Every update any replica produces is also applied to a reference document;
`check_convergence` (a rule, and the teardown) heals the network, waits until every
replica has the reference's state, and fails if they do not get there within
``CONVERGENCE_TIMEOUT`` seconds. Override `edit` to apply your application's own
operations (the default applies `crdtswarm.testing.strategies.doc_ops`), and
`state_of` to compare what your application cares about.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import pycrdt
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from crdtswarm.errors import ConnectError
from crdtswarm.identity import Identity
from crdtswarm.mesh import MeshConfig
from crdtswarm.swarm import Swarm, SwarmConfig
from crdtswarm.sync.replica import ReplicaConfig
from crdtswarm.testing.network import SimulatedNetwork
from crdtswarm.testing.strategies import (
    DocOp,
    Heal,
    Partition,
    Restart,
    ScheduleStep,
    SetLatency,
    apply_op,
    doc_ops,
    doc_state,
    schedule_steps,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SwarmMachine"]

# Quick reconnection after heals: the defaults are tuned for real networks.
_FAST = SwarmConfig(
    replica=ReplicaConfig(batch_interval=0.0),
    mesh=MeshConfig(
        tick_interval=0.05, retry_interval=0.05, max_retry_interval=0.2, shuffle_interval=0.5
    ),
    keepalive_interval=1.0,
    peer_timeout=5.0,
)


class SwarmMachine(RuleBasedStateMachine):
    """Random edits and network events on ``NODES`` swarm nodes; replicas must converge."""

    NODES: ClassVar[int] = 3
    """How many nodes the swarm has."""
    DOC_NAME: ClassVar[str] = "doc"
    """The replicated document the machine edits."""
    SEED: ClassVar[int] = 0
    """Seed of the simulated network and of the nodes' identities."""
    CONVERGENCE_TIMEOUT: ClassVar[float] = 30.0
    """Seconds replicas may take to converge after a heal."""
    RESTARTS: ClassVar[bool] = True
    """Whether schedules may restart nodes (from their data_dir)."""
    CONFIG: ClassVar[SwarmConfig] = _FAST
    """The nodes' configuration."""
    CALL_ON_HEAL: ClassVar[bool] = True
    """Whether `check_convergence` makes every node call node 0 after healing. Set it
    to False to rely on the mesh alone (the directory and its dials) to reconnect."""

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self._tmp = tempfile.TemporaryDirectory(prefix="crdtswarm-machine-")
        self.net = SimulatedNetwork(seed=self.SEED)
        self.identities = [
            Identity(hashlib.blake2b(f"{self.SEED}/{i}".encode(), digest_size=32).digest())
            for i in range(self.NODES)
        ]
        self.reference: pycrdt.Doc[Any] = pycrdt.Doc()
        self.nodes: list[Swarm] = []
        self._contexts: list[contextlib.AbstractContextManager[Swarm]] = []
        for index in range(self.NODES):
            self._start(index)
        for node in self.nodes[1:]:
            self.portal.call(self._call, node, self.nodes[0])

    # -- hooks for subclasses ----------------------------------------------------------

    def edit(self, doc: pycrdt.Doc[Any], op: DocOp) -> None:
        """Apply one operation to a replica (runs in the event loop thread)."""
        apply_op(doc, op)

    def state_of(self, doc: pycrdt.Doc[Any]) -> object:
        """What must be equal on every replica at the end."""
        return doc_state(doc)

    # -- rules -------------------------------------------------------------------------

    @rule(data=st.data(), op=doc_ops())
    def make_edit(self, data: st.DataObject, op: DocOp) -> None:
        """Edit the document at a random node."""
        index = data.draw(st.integers(0, self.NODES - 1), label="node")
        self.portal.call(self.edit, self.nodes[index].doc(self.DOC_NAME), op)

    @rule(data=st.data())
    def network_event(self, data: st.DataObject) -> None:
        """A partition, heal, restart or latency change."""
        step = data.draw(schedule_steps(self.NODES, restarts=self.RESTARTS), label="step")
        self.apply_step(step)

    @rule()
    def check_convergence(self) -> None:
        """Heal everything; every replica must reach the reference state."""
        self.portal.call(self._converge)

    def teardown(self) -> None:
        """Check convergence one last time, then stop every node."""
        try:
            self.portal.call(self._converge)
        finally:
            for context in reversed(self._contexts):
                with contextlib.suppress(Exception):
                    context.__exit__(None, None, None)
            self._portal_cm.__exit__(None, None, None)
            self._tmp.cleanup()

    def apply_step(self, step: ScheduleStep) -> None:
        """Perform one schedule step."""
        keys = [identity.public_key for identity in self.identities]
        match step:
            case Partition(group=group):
                inside = [keys[i] for i in sorted(group)]
                outside = [keys[i] for i in range(self.NODES) if i not in group]
                if outside:
                    self.portal.call(self.net.partition, inside, outside)
            case Heal():
                self.portal.call(self.net.heal)
            case Restart(node=index):
                self._contexts[index].__exit__(None, None, None)
                self._start(index)
            case SetLatency(a=a, b=b, latency=latency):
                if a != b:
                    self.portal.call(self.net.set_latency, keys[a], keys[b], latency)

    # -- machinery ---------------------------------------------------------------------

    def _start(self, index: int) -> None:
        data_dir = Path(self._tmp.name) / f"node{index}"
        swarm = Swarm(
            self.identities[index],
            [self.net.transport()],
            data_dir=data_dir,
            config=self.CONFIG,
        )
        context = self.portal.wrap_async_context_manager(swarm)
        node = context.__enter__()
        if index < len(self.nodes):
            self.nodes[index] = node
            self._contexts[index] = context
        else:
            self.nodes.append(node)
            self._contexts.append(context)
        self.portal.call(self._track, node)

    def _track(self, node: Swarm) -> None:
        reference = self.reference
        node.doc(self.DOC_NAME).observe(lambda event: reference.apply_update(event.update))
        reference.apply_update(node.doc(self.DOC_NAME).get_update())

    @staticmethod
    async def _call(node: Swarm, other: Swarm) -> None:
        with contextlib.suppress(ConnectError, TimeoutError):
            await node.call(other.public_key, timeout=5)

    async def _converge(self) -> None:
        self.net.heal()
        if self.CALL_ON_HEAL:
            for node in self.nodes[1:]:
                await self._call(node, self.nodes[0])
        docs = [node.doc(self.DOC_NAME) for node in self.nodes]
        expected: Callable[[], object] = lambda: self.state_of(self.reference)  # noqa: E731

        def converged() -> bool:
            want = expected()
            return all(self.state_of(doc) == want for doc in docs)

        changed = anyio.Event()

        def notify(_event: object) -> None:
            changed.set()

        subscriptions = [(doc, doc.observe(notify)) for doc in [*docs, self.reference]]
        try:
            with anyio.fail_after(self.CONVERGENCE_TIMEOUT):
                while not converged():
                    await changed.wait()
                    changed = anyio.Event()
        except TimeoutError:
            keys = [node.public_key for node in self.nodes]
            lines = [
                f"node{i} {self.state_of(doc)!r} links={sorted(keys.index(k) for k in node.peers)}"
                f" members={len(node.members)}"
                for i, (node, doc) in enumerate(zip(self.nodes, docs, strict=True))
            ]
            raise AssertionError(
                f"replicas did not converge within {self.CONVERGENCE_TIMEOUT} s:\n"
                f"reference {expected()!r}\n" + "\n".join(lines)
            ) from None
        finally:
            for doc, subscription in subscriptions:
                doc.unobserve(subscription)
