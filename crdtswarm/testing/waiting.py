"""Waiting for what the directory says, without sleeping: `wait_for_directory`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from crdtswarm.sync.directory import DOC_NAME as DIRECTORY_DOC

if TYPE_CHECKING:
    from collections.abc import Callable

    from crdtswarm.swarm import Swarm

__all__ = ["wait_for_directory"]


async def wait_for_directory(
    node: Swarm,
    condition: Callable[[], bool],
    *,
    timeout: float = 10.0,
    recheck: float | None = None,
) -> None:
    """Wait until ``condition()`` holds, checking it after each change of ``node``'s directory.

    Members, latency rows and hence routes (`Swarm.route`) change with the
    directory, so this waits for them without polling. Give ``recheck`` (seconds)
    for conditions that also change on a timer (hub elections, expiries).

    Raises:
        TimeoutError: ``condition()`` still does not hold after ``timeout`` seconds.
    """
    directory = node.doc(DIRECTORY_DOC)
    changed = anyio.Event()

    def notify(_event: object) -> None:
        changed.set()

    subscription = directory.observe(notify)
    try:
        with anyio.fail_after(timeout):
            while not condition():
                with anyio.move_on_after(recheck if recheck is not None else timeout):
                    await changed.wait()
                changed = anyio.Event()
                await anyio.wait_all_tasks_blocked()  # let the node take the change in
    finally:
        directory.unobserve(subscription)
