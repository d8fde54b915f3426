"""``crdtswarm node``: a long-lived swarm node, one line of output per thing that happens.

Output (stdout, one line each, first word first so that scripts can grep it)::

    identity created node.key (mode 0600)    only when --identity named no file
    key <public key>                          this node's key: what others --join
    address tcp://127.0.0.1:4242              one line per address others can call
    signaling ws://127.0.0.1:8765             each signaling server that answered
    doc notes opened (2 entries)              each document opened (--doc, or asked
                                              for by ``crdtswarm doc``)
    joined <short key> tcp://...|by key       each --join that linked
    ready (1 peer, 2 members)                 started: joins done, serving
    connected <short key> tcp://...           a direct link came up
    disconnected <short key> (<reason>)       ... went down
    member joined <short key>                 the directory gained a member
    member left <short key>                   ... lost one
    doc notes: greeting = "hello"             a value changed in an open document
    doc notes: greeting deleted               ... was deleted
    stopped: clean shutdown                   the last line, after SIGINT or SIGTERM

The node serves ``crdtswarm doc get|set`` (see `crdtswarm.cli.docsync`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import click
import pycrdt

from crdtswarm.cli.app import CliError
from crdtswarm.cli.docsync import DEFAULT_MAP, METHOD, DocService, plain
from crdtswarm.cli.launch import (
    JOIN_HELP,
    SWARM_KEY_ENV,
    SWARM_KEY_HELP,
    JoinTarget,
    WrongKeyError,
    build_swarm,
    check_signaling,
    join,
    listen_errors,
    load_identity,
    parse_announce,
    parse_join,
    parse_listen,
    parse_swarm_key,
    run_until_signal,
    say,
    unwrapped_errors,
)
from crdtswarm.swarm import PeerConnected, PeerDisconnected, Swarm
from crdtswarm.sync.directory import MemberJoined, MemberLeft

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import TaskGroup

    from crdtswarm.cli.launch import Lifetime
    from crdtswarm.identity import Identity
    from crdtswarm.swarm import SwarmEvent

__all__ = ["NodeSettings", "node", "register", "run_node"]

DEFAULT_LISTEN = "127.0.0.1:0"


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeSettings:
    """What ``crdtswarm node`` was asked to do, checked."""

    identity: Identity | None
    """The node's keypair; None: the data directory's, or a new one."""
    data_dir: str | None
    """Where documents (and the identity, without --identity) persist."""
    listen: tuple[str, int]
    """TCP host and port to listen on (port 0: any free port)."""
    announce: tuple[str, ...]
    """TCP addresses to tell others instead of the listened one (port forwarding)."""
    swarm_key: bytes | None
    """The private swarm's key (None: a public swarm)."""
    webrtc: bool
    """Whether to link over WebRTC too."""
    stun: tuple[str, ...]
    """STUN server URLs for WebRTC."""
    signaling: tuple[str, ...]
    """Signaling server URLs."""
    signaling_timeout: float
    """Seconds to wait for a signaling server's answer at start."""
    joins: tuple[JoinTarget, ...]
    """Members to call at start."""
    join_timeout: float
    """Seconds each call may take."""
    docs: tuple[str, ...]
    """Documents to open at start."""
    map_name: str
    """The map of each document whose changes are printed."""


def _count(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


class _Docs:
    """Opens documents for the node and prints the changes to their map."""

    def __init__(self, swarm: Swarm, map_name: str) -> None:
        self._swarm = swarm
        self._map_name = map_name
        self._opened: dict[str, pycrdt.Doc[Any]] = {}
        self._subscriptions: list[tuple[pycrdt.Map[Any], pycrdt.Subscription]] = []

    def open(self, name: str) -> pycrdt.Doc[Any]:
        """The document ``name``, opened (and watched) the first time.

        Raises:
            ValueError: the name is empty or too long.
        """
        doc = self._opened.get(name)
        if doc is not None:
            return doc
        doc = self._swarm.doc(name)
        data = doc.get(self._map_name, type=pycrdt.Map)
        self._opened[name] = doc
        say(f"doc {name} opened ({_count(len(data), 'entry', 'entries')})")

        def show(event: pycrdt.MapEvent) -> None:
            # pycrdt declares MapEvent.keys in __slots__ only
            for key, change in event.keys.items():  # type: ignore[attr-defined]
                if change.get("action") == "delete":
                    say(f"doc {name}: {key} deleted")
                else:
                    value = json.dumps(plain(change.get("newValue")), default=str)
                    say(f"doc {name}: {key} = {value}")

        self._subscriptions.append((data, data.observe(show)))
        return doc

    def close(self) -> None:
        """Stop printing changes."""
        for data, subscription in self._subscriptions:
            data.unobserve(subscription)
        self._subscriptions.clear()


async def _show_events(swarm: Swarm, events: AsyncIterator[SwarmEvent]) -> None:
    async for event in events:
        short = event.public_key.short
        match event:
            case PeerConnected():
                peer = swarm.peers.get(event.public_key)
                where = peer.remote_address if peer is not None else None
                say(f"connected {short} {where or '-'}")
            case PeerDisconnected(reason=reason):
                say(f"disconnected {short} ({reason})")
            case MemberJoined():
                say(f"member joined {short}")
            case MemberLeft():
                say(f"member left {short}")


async def run_node(settings: NodeSettings, lifetime: Lifetime) -> None:
    """Start the node, join, serve until ``lifetime`` says stop, then shut down cleanly.

    Raises:
        CliError: no signaling server answered, or every --join failed (or one
            reached a node with another key).
        OSError: the TCP listener could not start (see `listen_errors`).
    """
    answered: tuple[str, ...] = ()
    if settings.signaling:
        answered = tuple(await check_signaling(settings.signaling, settings.signaling_timeout))
    swarm = build_swarm(
        identity=settings.identity,
        listen=settings.listen,
        announce=settings.announce,
        swarm_key=settings.swarm_key,
        webrtc=settings.webrtc,
        stun=settings.stun,
        signaling=settings.signaling,  # all: the swarm keeps trying those that did not answer
        data_dir=settings.data_dir,
    )
    events = swarm.events()  # subscribed before the first link can come up
    async with anyio.create_task_group() as tg:
        await _serve(swarm, settings, answered, events, tg, lifetime)


async def _serve(
    swarm: Swarm,
    settings: NodeSettings,
    answered: tuple[str, ...],
    events: AsyncIterator[SwarmEvent],
    tg: TaskGroup,
    lifetime: Lifetime,
) -> None:
    async with swarm:
        tg.start_soon(_show_events, swarm, events)  # ends when the swarm closes
        say(f"key {swarm.public_key}")
        for address in swarm.addresses:
            say(f"address {address}")
        for url in answered:
            say(f"signaling {url}")
        docs = _Docs(swarm, settings.map_name)
        try:
            for name in settings.docs:
                docs.open(name)
            service = DocService(docs.open, lambda: swarm.peers.values(), opened=settings.docs)
            swarm.handle_rpc(METHOD, service.handle)
            await _join_all(swarm, settings)
            peers, members = len(swarm.peers), len(swarm.members)
            say(f"ready ({_count(peers, 'peer', 'peers')}, {_count(members, 'member', 'members')})")
            lifetime.set_ready()
            await lifetime.stopping.wait()
        finally:
            docs.close()


async def _join_all(swarm: Swarm, settings: NodeSettings) -> None:
    """Call every --join member at once; fail when none linked, or a key was wrong."""
    errors: list[CliError] = []

    async def one(target: JoinTarget) -> None:
        try:
            await join(swarm, target, settings.join_timeout)
        except CliError as exc:
            errors.append(exc)
            return
        say(f"joined {target.key.short} {target.address or 'by key'}")

    async with anyio.create_task_group() as tg:
        for target in settings.joins:
            tg.start_soon(one, target)
    wrong_key = [e for e in errors if isinstance(e, WrongKeyError)]
    if wrong_key or (errors and len(errors) == len(settings.joins)):
        raise (wrong_key or errors)[0]
    for error in errors:
        click.echo(f"crdtswarm: warning: {error.message}", err=True)


_EXAMPLES = """\b
Two nodes on one machine, sharing the document 'notes':
  crdtswarm node --doc notes                  # prints: key K, address A
  crdtswarm node --doc notes --join K@A       # in another terminal
  crdtswarm doc set --join K@A notes greeting hello

Output lines: 'key KEY', 'address ADDRESS', 'ready (...)', 'connected SHORTKEY
ADDRESS', 'disconnected SHORTKEY (REASON)', 'member joined|left SHORTKEY',
'doc NAME: KEY = JSON', and last 'stopped: clean shutdown'.
"""


@click.command("node", epilog=_EXAMPLES)
@click.option(
    "--identity",
    "identity_path",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Identity file (the node's keypair); created with mode 0600 if missing. "
    "Default: DIR/identity.key with --data-dir, else a new key on every start.",
)
@click.option(
    "--data-dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Persist the documents (SQLite) and, without --identity, the identity in DIR; "
    "a node restarted with the same DIR comes back with both. Default: memory only.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="TCP address to listen on; port 0 picks a free one (printed as 'address'). "
    "The default takes calls from this machine only: use 0.0.0.0:PORT on a server "
    "(the node then prints this machine's interface addresses).",
)
@click.option(
    "--announce",
    metavar="HOST:PORT",
    multiple=True,
    help="TCP address to tell others instead of the listened one, e.g. the public "
    "address a router forwards to --listen (repeatable).",
)
@click.option("--swarm-key", metavar="HEX", envvar=SWARM_KEY_ENV, help=SWARM_KEY_HELP)
@click.option(
    "--webrtc/--no-webrtc",
    default=True,
    show_default=True,
    help="Also link over WebRTC (reached by key, offers through --signal servers or the swarm).",
)
@click.option(
    "--stun",
    metavar="URL",
    multiple=True,
    help="STUN server for WebRTC behind NATs, e.g. stun:stun.l.google.com:19302 "
    "(repeatable; none by default).",
)
@click.option(
    "--signal",
    "signaling",
    metavar="URL",
    multiple=True,
    help="Signaling server (ws://host:port, see 'crdtswarm signal-server'), needed to "
    "join by key alone (repeatable). If none answers at start the node stops with an "
    "error; one that does not is reported, and tried again in the background.",
)
@click.option(
    "--signal-timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for a signaling server to answer at start.",
)
@click.option("--join", "joins", metavar="KEY[@ADDRESS]", multiple=True, help=JOIN_HELP)
@click.option(
    "--join-timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds each --join may take. The node stops with an error if no --join "
    "links, or one reaches a node with another key.",
)
@click.option(
    "--doc",
    "docs",
    metavar="NAME",
    multiple=True,
    help="Open and replicate the document NAME from the start, printing its changes "
    "(repeatable). Documents asked for by 'crdtswarm doc' are opened too.",
)
@click.option(
    "--map",
    "map_name",
    metavar="NAME",
    default=DEFAULT_MAP,
    show_default=True,
    help="The root-level map of each document whose changes are printed.",
)
def node(
    identity_path: str | None,
    data_dir: str | None,
    listen: str,
    announce: tuple[str, ...],
    swarm_key: str | None,
    webrtc: bool,
    stun: tuple[str, ...],
    signaling: tuple[str, ...],
    signal_timeout: float,
    joins: tuple[str, ...],
    join_timeout: float,
    docs: tuple[str, ...],
    map_name: str,
) -> None:
    """Run a swarm node until Ctrl-C (SIGINT) or SIGTERM.

    It prints its key and addresses, then one line per link, member and document
    change; on SIGINT or SIGTERM it leaves the swarm, closes every link, keeps its
    documents in --data-dir, prints 'stopped: clean shutdown' and exits 0.
    """
    targets = tuple(parse_join(text) for text in joins)
    if any(t.address is None for t in targets) and not (signaling and webrtc):
        raise CliError(
            "--join KEY without @ADDRESS needs WebRTC and a --signal server "
            "(or give the member's tcp address: --join KEY@HOST:PORT)"
        )
    identity, created = load_identity(identity_path, create=True)
    if created:
        say(f"identity created {identity_path} (mode 0600)")
    settings = NodeSettings(
        identity=identity,
        data_dir=data_dir,
        listen=parse_listen(listen),
        announce=tuple(parse_announce(text) for text in announce),
        swarm_key=parse_swarm_key(swarm_key),
        webrtc=webrtc,
        stun=stun,
        signaling=signaling,
        signaling_timeout=signal_timeout,
        joins=targets,
        join_timeout=join_timeout,
        docs=docs,
        map_name=map_name,
    )

    async def main(lifetime: Lifetime) -> None:
        await run_node(settings, lifetime)

    with listen_errors(settings.listen), unwrapped_errors():
        lifetime = anyio.run(run_until_signal, main)
    how = "clean shutdown" if lifetime.is_ready and not lifetime.forced else "interrupted"
    if lifetime.is_ready and not lifetime.forced and data_dir:
        how += f", documents saved in {data_dir}"
    say(f"stopped: {how}")


def register(group: click.Group) -> None:
    """Add ``node`` to the command line."""
    group.add_command(node)
