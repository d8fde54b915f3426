"""Hypothesis strategies for document operations and swarm schedules.

Document operations act on three root types of a `pycrdt.Doc`: a map ``"map"``,
a text ``"text"`` and an array ``"array"``. Positions are fractions of the current
length, so an operation generated once applies to any replica, whatever its state::

    from hypothesis import given
    from crdtswarm.testing.strategies import apply_op, doc_ops

    @given(doc_ops())
    def test_apply(op):
        doc = pycrdt.Doc()
        apply_op(doc, op)

Schedule steps (`Partition`, `Heal`, `Restart`, `SetLatency`) describe what happens
to the network and the nodes; `crdtswarm.testing.machine.SwarmMachine` performs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import pycrdt
from hypothesis import strategies as st

__all__ = [
    "ArrayDelete",
    "ArrayInsert",
    "DocOp",
    "Heal",
    "MapDelete",
    "MapSet",
    "Partition",
    "Restart",
    "ScheduleStep",
    "SetLatency",
    "TextDelete",
    "TextInsert",
    "apply_op",
    "doc_ops",
    "doc_state",
    "schedule_steps",
]

MAP, TEXT, ARRAY = "map", "text", "array"


@dataclass(frozen=True, kw_only=True, slots=True)
class MapSet:
    """Set ``key`` of the map to ``value``."""

    key: str
    value: str | float | bool | None


@dataclass(frozen=True, kw_only=True, slots=True)
class MapDelete:
    """Delete ``key`` from the map (nothing when absent)."""

    key: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TextInsert:
    """Insert ``text`` at ``position`` x the current length."""

    position: float
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TextDelete:
    """Delete up to ``length`` characters at ``position`` x the current length."""

    position: float
    length: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ArrayInsert:
    """Insert ``value`` at ``position`` x the current length."""

    position: float
    value: str | float | bool | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ArrayDelete:
    """Delete the item at ``position`` x the current length (nothing when empty)."""

    position: float


DocOp: TypeAlias = MapSet | MapDelete | TextInsert | TextDelete | ArrayInsert | ArrayDelete


@dataclass(frozen=True, kw_only=True, slots=True)
class Partition:
    """Cut the network between the nodes in ``group`` (indices) and all the others."""

    group: frozenset[int]


@dataclass(frozen=True, kw_only=True, slots=True)
class Heal:
    """Remove every partition and block."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Restart:
    """Stop node ``node`` and start it again from its data_dir."""

    node: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SetLatency:
    """Set the one-way latency between nodes ``a`` and ``b``, in seconds."""

    a: int
    b: int
    latency: float


ScheduleStep: TypeAlias = Partition | Heal | Restart | SetLatency

_keys = st.sampled_from([f"k{i}" for i in range(8)])
# Floats rather than ints: pycrdt reads numbers back as floats, so the model matches.
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
)
_positions = st.floats(min_value=0.0, max_value=1.0)
# ASCII keeps text positions identical in pycrdt (UTF-8 offsets) and yjs (UTF-16).
_texts = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=6
)


def doc_ops() -> st.SearchStrategy[DocOp]:
    """Random operations on the ``map``, ``text`` and ``array`` roots."""
    return st.one_of(
        st.builds(MapSet, key=_keys, value=_values),
        st.builds(MapDelete, key=_keys),
        st.builds(TextInsert, position=_positions, text=_texts),
        st.builds(TextDelete, position=_positions, length=st.integers(1, 4)),
        st.builds(ArrayInsert, position=_positions, value=_values),
        st.builds(ArrayDelete, position=_positions),
    )


def schedule_steps(nodes: int, *, restarts: bool = True) -> st.SearchStrategy[ScheduleStep]:
    """Random partitions, heals, restarts and latency changes for ``nodes`` nodes."""
    index = st.integers(0, nodes - 1)
    steps: list[st.SearchStrategy[ScheduleStep]] = [
        st.builds(
            Partition,
            group=st.frozensets(index, min_size=1, max_size=max(1, nodes - 1)),
        ),
        st.just(Heal()),
        st.builds(SetLatency, a=index, b=index, latency=st.floats(0.0, 0.05)),
    ]
    if restarts:
        steps.append(st.builds(Restart, node=index))
    return st.one_of(*steps)


def _at(position: float, length: int) -> int:
    return min(length, int(position * (length + 1)))


def apply_op(doc: pycrdt.Doc[Any], op: DocOp) -> None:
    """Apply ``op`` to ``doc`` in one transaction."""
    with doc.transaction():
        match op:
            case MapSet(key=key, value=value):
                doc.get(MAP, type=pycrdt.Map)[key] = value
            case MapDelete(key=key):
                the_map = doc.get(MAP, type=pycrdt.Map)
                if key in the_map:
                    del the_map[key]
            case TextInsert(position=position, text=text):
                the_text = doc.get(TEXT, type=pycrdt.Text)
                the_text.insert(_at(position, len(the_text)), text)
            case TextDelete(position=position, length=length):
                the_text = doc.get(TEXT, type=pycrdt.Text)
                size = len(the_text)
                if size:
                    start = min(_at(position, size), size - 1)
                    del the_text[start : min(size, start + length)]
            case ArrayInsert(position=position, value=value):
                array = doc.get(ARRAY, type=pycrdt.Array)
                array.insert(_at(position, len(array)), value)
            case ArrayDelete(position=position):
                array = doc.get(ARRAY, type=pycrdt.Array)
                if len(array):
                    del array[min(_at(position, len(array)), len(array) - 1)]


def doc_state(doc: pycrdt.Doc[Any]) -> tuple[dict[str, Any], str, list[Any]]:
    """The contents of the three roots, for comparing replicas."""
    return (
        doc.get(MAP, type=pycrdt.Map).to_py() or {},
        str(doc.get(TEXT, type=pycrdt.Text)),
        doc.get(ARRAY, type=pycrdt.Array).to_py() or [],
    )
