"""Convergence, tested with the kit users get (crdtswarm/testing)."""

from __future__ import annotations

import dataclasses
import unittest

import pycrdt
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from crdtswarm.testing.machine import SwarmMachine
from crdtswarm.testing.strategies import DocOp, apply_op, doc_ops, doc_state


@given(st.lists(st.tuples(st.integers(0, 2), doc_ops()), max_size=40))
def test_random_ops_on_three_docs_converge_after_exchange(ops: list[tuple[int, DocOp]]) -> None:
    docs: list[pycrdt.Doc] = [pycrdt.Doc() for _ in range(3)]
    for index, op in ops:
        apply_op(docs[index], op)
    for source in docs:
        for target in docs:
            target.apply_update(source.get_update(target.get_state()))
    states = [doc_state(doc) for doc in docs]
    assert states[0] == states[1] == states[2]


class ThreeNodes(SwarmMachine):
    """Edits, partitions, heals, restarts and latency changes on three nodes."""

    NODES = 3
    SEED = 1


ThreeNodes.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestThreeNodes = ThreeNodes.TestCase


class NeverConverges(SwarmMachine):
    """A machine whose replicas can never agree: the kit must report it, not hang."""

    NODES = 2
    CONVERGENCE_TIMEOUT = 0.5

    def state_of(self, doc: pycrdt.Doc) -> object:
        return (doc_state(doc), doc.client_id)  # every replica differs from the reference


def test_the_kit_reports_replicas_that_do_not_converge() -> None:
    NeverConverges.TestCase.settings = settings(
        max_examples=1,
        stateful_step_count=3,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: every failing run waits for the timeout
        suppress_health_check=list(HealthCheck),
    )
    suite = unittest.TestLoader().loadTestsFromTestCase(NeverConverges.TestCase)
    result = unittest.TestResult()
    suite.run(result)
    failures = result.failures + result.errors
    assert failures, "a machine whose replicas differ must fail"
    assert "did not converge" in failures[0][1]


class SixNodesPartialMesh(SwarmMachine):
    """Six nodes that keep two links each: updates must cross a partial mesh under churn."""

    NODES = 6
    SEED = 2
    CALL_ON_HEAL = False  # after a heal, the mesh alone must reconnect everybody
    CONFIG = dataclasses.replace(
        SwarmMachine.CONFIG,
        mesh=dataclasses.replace(SwarmMachine.CONFIG.mesh, max_peers=2, min_link_age=0.2),
    )


SixNodesPartialMesh.TestCase.settings = settings(
    max_examples=6,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSixNodesPartialMesh = SixNodesPartialMesh.TestCase
