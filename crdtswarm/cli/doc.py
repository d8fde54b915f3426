"""``crdtswarm doc get|set``: read or write a document of a running swarm, then exit.

Each command starts a short-lived node (a new key unless ``--identity``), calls the
``crdtswarm node`` named by ``--join``, syncs the document with it and leaves. The
values are those of one root-level map of the document, ``data`` unless ``--map``
(see `crdtswarm.cli.docsync` for the convention and how the node acknowledges).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
import pycrdt

from crdtswarm.cli.app import CliError
from crdtswarm.cli.docsync import DEFAULT_MAP, plain, sync_with
from crdtswarm.cli.launch import (
    JOIN_HELP,
    SWARM_KEY_ENV,
    SWARM_KEY_HELP,
    JoinTarget,
    build_swarm,
    check_signaling,
    join,
    load_identity,
    parse_join,
    parse_swarm_key,
    say,
    unwrapped_errors,
)
from crdtswarm.errors import ErrorCode, RpcError
from crdtswarm.swarm import SwarmConfig

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from crdtswarm.identity import Identity
    from crdtswarm.peer import Peer

__all__ = ["ClientSettings", "doc", "doc_get", "doc_set", "register", "run_get", "run_set"]

_T = TypeVar("_T")

# A short-lived node links only to the node it calls, and does not probe the link.
_CLIENT_CONFIG = SwarmConfig(auto_mesh=False, probe=None)
_MAX_SIGNALING_CHECK = 5.0  # seconds a signaling server has to answer


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientSettings:
    """How a ``doc`` command reaches the swarm, checked."""

    identity: Identity | None
    """The short-lived node's keypair; None: a new one."""
    target: JoinTarget
    """The node to call and sync with."""
    signaling: tuple[str, ...]
    """Signaling servers (to call the node by key alone)."""
    stun: tuple[str, ...]
    """STUN servers for WebRTC."""
    swarm_key: bytes | None
    """The private swarm's key (None: a public swarm)."""
    timeout: float
    """Seconds the call and the sync may take together."""
    map_name: str
    """The root-level map holding the values."""


@dataclass(slots=True)
class _Session:
    """One ``doc`` command's link, document, and the step it is at (for errors)."""

    peer: Peer
    name: str
    doc: pycrdt.Doc[Any]
    data: pycrdt.Map[Any]
    step: list[str]
    """One item, updated as the command goes: what it was doing if it times out."""

    @property
    def who(self) -> str:
        return self.peer.public_key.short

    def doing(self, step: str) -> None:
        self.step[0] = step


async def _with_node(
    settings: ClientSettings, name: str, work: Callable[[_Session], Awaitable[_T]]
) -> _T:
    """Start a short-lived node, link it to the target, run ``work``, shut it down.

    Raises:
        CliError: no signaling server answered, the target could not be reached,
            or the whole exchange took longer than ``settings.timeout``.
    """
    signaling = settings.signaling
    if signaling:
        timeout = min(settings.timeout, _MAX_SIGNALING_CHECK)
        signaling = tuple(await check_signaling(signaling, timeout))
    swarm = build_swarm(
        identity=settings.identity,
        listen=("127.0.0.1", 0),
        webrtc=bool(signaling),
        stun=settings.stun,
        signaling=signaling,
        swarm_key=settings.swarm_key,
        config=_CLIENT_CONFIG,
    )
    async with swarm:
        doc = swarm.doc(name)
        data = doc.get(settings.map_name, type=pycrdt.Map)
        step = [f"joining {settings.target}"]
        try:
            with anyio.fail_after(settings.timeout):
                peer = await join(swarm, settings.target, settings.timeout)
                return await work(_Session(peer, name, doc, data, step))
        except TimeoutError:
            raise CliError(f"timed out after {settings.timeout:g} s {step[0]}") from None


async def _sync(session: _Session, *, wait_here: bool, timeout: float) -> None:
    """One `sync_with` round with the target, its failures as `CliError`."""
    name, who = session.name, session.who
    try:
        await sync_with(session.peer, name, session.doc, timeout=timeout, wait_here=wait_here)
    except RpcError as exc:
        if isinstance(exc, TimeoutError):
            raise CliError(f"timed out after {timeout:g} s {session.step[0]}") from None
        if exc.code == ErrorCode.UNKNOWN_METHOD:
            raise CliError(f"{who} does not serve doc commands (not a 'crdtswarm node')") from None
        raise CliError(f"{who} refused to sync document {name!r}: {exc.message}") from None
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        raise CliError(f"the link to {who} went down {session.step[0]}") from None
    except ValueError as exc:
        raise CliError(f"{who} sent a malformed answer: {exc}") from None


async def run_get(settings: ClientSettings, name: str) -> dict[str, Any]:
    """The values of document ``name``, once synced from the target node.

    Raises:
        CliError: the node could not be reached or did not sync in time.
    """

    async def work(session: _Session) -> dict[str, Any]:
        session.doing(f"syncing document {name!r} from {session.who}")
        await _sync(session, wait_here=True, timeout=settings.timeout)
        values = session.data.to_py() or {}
        return {str(k): plain(v) for k, v in values.items()}

    return await _with_node(settings, name, work)


async def run_set(settings: ClientSettings, name: str, key: str, value: object) -> Peer:
    """Set ``key`` to ``value`` in document ``name``; return the node that acknowledged it.

    Raises:
        CliError: the node could not be reached or did not sync in time.
    """

    async def work(session: _Session) -> Peer:
        # catch up first: our write must come after every write the node has seen
        session.doing(f"syncing document {name!r} from {session.who}")
        await _sync(session, wait_here=True, timeout=settings.timeout)
        session.data[key] = value
        session.doing(f"waiting for {session.who} to acknowledge the change")
        await _sync(session, wait_here=False, timeout=settings.timeout)
        return session.peer

    return await _with_node(settings, name, work)


def _settings(
    *,
    join_text: str,
    signaling: tuple[str, ...],
    stun: tuple[str, ...],
    identity_path: str | None,
    swarm_key: str | None,
    timeout: float,
    map_name: str,
) -> ClientSettings:
    target = parse_join(join_text)
    if target.address is None and not signaling:
        raise CliError(
            "--join KEY without @ADDRESS needs a --signal server "
            "(or give the node's tcp address: --join KEY@HOST:PORT)"
        )
    identity, _ = load_identity(identity_path, create=False)
    return ClientSettings(
        identity=identity,
        target=target,
        signaling=signaling,
        stun=stun,
        swarm_key=parse_swarm_key(swarm_key),
        timeout=timeout,
        map_name=map_name,
    )


def _client_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the options every ``doc`` command takes."""
    options = (
        click.option(
            "--join",
            "join_text",
            metavar="KEY[@ADDRESS]",
            required=True,
            help=f"{JOIN_HELP} It must be a running 'crdtswarm node'.",
        ),
        click.option(
            "--signal",
            "signaling",
            metavar="URL",
            multiple=True,
            help="Signaling server (ws://host:port), to --join by KEY alone (repeatable).",
        ),
        click.option(
            "--stun",
            metavar="URL",
            multiple=True,
            help="STUN server for WebRTC behind NATs (repeatable).",
        ),
        click.option(
            "--identity",
            "identity_path",
            metavar="PATH",
            type=click.Path(dir_okay=False),
            help="Identity file to act as (see 'crdtswarm key generate'). Default: a new "
            "key for this command only.",
        ),
        click.option("--swarm-key", metavar="HEX", envvar=SWARM_KEY_ENV, help=SWARM_KEY_HELP),
        click.option(
            "--timeout",
            metavar="SECONDS",
            type=click.FloatRange(min=0, min_open=True),
            default=20.0,
            show_default=True,
            help="Seconds to link to the node and sync the document; then exit 1.",
        ),
        click.option(
            "--map",
            "map_name",
            metavar="NAME",
            default=DEFAULT_MAP,
            show_default=True,
            help="The root-level map of the document holding the values.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _run(main: Callable[[], Awaitable[_T]]) -> _T:
    with unwrapped_errors():
        return anyio.run(main)


_EXAMPLES = """\b
With a node started by 'crdtswarm node' (it prints: key K, address A):
  crdtswarm doc set --join K@A notes greeting hello
  crdtswarm doc get --join K@A notes greeting      # prints: hello
  crdtswarm doc get --join K@A notes               # prints: {"greeting": "hello"}
"""


@click.group("doc", epilog=_EXAMPLES)
def doc() -> None:
    """Read or write a document of a running swarm, through one of its nodes.

    The values live in a root-level map of the document (--map, default 'data').
    Each command starts a short-lived node, calls the 'crdtswarm node' given by
    --join, syncs the document with it, prints, and exits: 0 when done, 1 with one
    error line when the node cannot be reached or does not sync within --timeout.
    """


@doc.command("get")
@click.argument("name")
@click.argument("key", required=False)
@_client_options
def doc_get(name: str, key: str | None, **options: Any) -> None:
    """Print the value of KEY in document NAME, or all its values as a JSON object.

    A string value prints as it is, any other as JSON. A KEY the document does not
    have is an error (exit 1).
    """
    settings = _settings(**options)
    values = _run(lambda: run_get(settings, name))
    if key is None:
        say(json.dumps(values, sort_keys=True, ensure_ascii=False, default=str))
        return
    if key not in values:
        raise CliError(f"document {name!r} has no key {key!r} in map {settings.map_name!r}")
    value = values[key]
    say(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))


@doc.command("set")
@click.argument("name")
@click.argument("key")
@click.argument("value")
@_client_options
@click.option("--json", "as_json", is_flag=True, help="VALUE is JSON (a number, list, ...).")
def doc_set(name: str, key: str, value: str, as_json: bool, **options: Any) -> None:
    """Set KEY to VALUE (a string) in document NAME; return once the node holds it.

    Prints 'set NAME KEY' and the key of the node that acknowledged the change;
    from that node it reaches every node that has the document open.
    """
    settings = _settings(**options)
    stored: object = value
    if as_json:
        try:
            stored = json.loads(value)
        except json.JSONDecodeError as exc:
            raise CliError(f"VALUE is not JSON: {exc}") from None
    peer = _run(lambda: run_set(settings, name, key, stored))
    say(f"set {name} {key} (acknowledged by {peer.public_key.short})")


def register(group: click.Group) -> None:
    """Add ``doc get`` and ``doc set`` to the command line."""
    group.add_command(doc)
