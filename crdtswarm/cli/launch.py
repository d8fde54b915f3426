"""How the command line's nodes start, join and stop (``node``, ``doc``, ``signal-server``).

Everything here turns what a person typed, and what went wrong, into something they
can act on: `parse_join` and `parse_listen` check option values, `load_identity`
reads (or creates) an identity file, `check_signaling` makes sure a signaling server
answers before a node relies on it, `join` links to a member and names the reason
when it cannot, and `run_until_signal` runs a long-lived command until SIGINT or
SIGTERM. Every failure is a `crdtswarm.cli.app.CliError`: one line, exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidURI, WebSocketException

from crdtswarm.cli.app import CliError, write_new_identity
from crdtswarm.errors import ConnectError, HandshakeError, IdentityMismatchError
from crdtswarm.identity import Identity, PublicKey
from crdtswarm.signaling.server import FrameType
from crdtswarm.swarm import Swarm, SwarmConfig
from crdtswarm.transport.tcp import TcpTransport, parse_address
from crdtswarm.transport.webrtc import WebRTCTransport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from crdtswarm.peer import Peer
    from crdtswarm.transport.abc import Transport

__all__ = [
    "JOIN_HELP",
    "JoinTarget",
    "Lifetime",
    "WrongKeyError",
    "build_swarm",
    "check_signaling",
    "join",
    "listen_errors",
    "load_identity",
    "parse_join",
    "parse_listen",
    "run_until_signal",
    "say",
    "unwrapped_errors",
]

_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

JOIN_HELP = (
    "A member to call, as KEY@ADDRESS (ADDRESS is tcp://host:port or host:port, one of "
    "the 'address' lines that member printed) or as KEY alone (reached over WebRTC, "
    "the offer going through --signal servers)."
)


def say(text: str) -> None:
    """Print one line of a command's output (flushed: scripts read it as it comes)."""
    click.echo(text)


# -- option values -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinTarget:
    """A member to call: its key, and the TCP address to call it at (None: by key)."""

    key: PublicKey
    address: str | None

    def __str__(self) -> str:
        return f"{self.key.short}@{self.address}" if self.address else self.key.short


def parse_join(text: str) -> JoinTarget:
    """Parse a ``--join`` value: ``KEY``, ``KEY@host:port`` or ``KEY@tcp://host:port``.

    ``KEY@webrtc://KEY`` (an address line of ``crdtswarm node``) means by key.

    Raises:
        CliError: the key is not a public key, or the address not a TCP address.
    """
    key_text, sep, address = text.strip().partition("@")
    try:
        key = PublicKey.parse(key_text)
    except ValueError as exc:
        raise CliError(f"--join {text!r}: not a public key ({exc})") from None
    if not sep:
        return JoinTarget(key, None)
    if address.startswith("webrtc://"):
        if address != f"webrtc://{key}":
            raise CliError(f"--join {text!r}: a webrtc:// address names the same key")
        return JoinTarget(key, None)
    if "://" not in address:
        address = f"tcp://{address}"
    try:
        parse_address(address)
    except ValueError as exc:
        raise CliError(f"--join {text!r}: {exc}") from None
    return JoinTarget(key, address)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse a ``--listen`` value, ``HOST:PORT`` or ``[IPV6]:PORT``, into ``(host, port)``.

    Raises:
        CliError: not of that form, or the port is not 0 to 65535.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or (":" in host and not text.startswith("[")):
        raise CliError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:4242")
    if not (port_text.isascii() and port_text.isdigit() and int(port_text) < 65536):
        raise CliError(f"--listen {text!r}: the port must be 0 to 65535")
    return host, int(port_text)


def load_identity(path: str | None, *, create: bool) -> tuple[Identity | None, bool]:
    """The identity in the file ``path`` and whether it was just created.

    ``path`` None gives ``(None, False)``: the caller lets `Swarm` choose (a key in
    its data directory, or a fresh one). With ``create``, a missing file is written
    with a new identity (mode 0600).

    Raises:
        CliError: the file is missing (without ``create``), unreadable, readable by
            others, or malformed; or it cannot be created.
    """
    if path is None:
        return None, False
    file = Path(path)
    try:
        return Identity.load(file), False
    except FileNotFoundError:
        if not create:
            raise CliError(
                f"identity file {file} does not exist (create one with: crdtswarm key "
                f"generate {file})"
            ) from None
    except ValueError as exc:  # IdentityFileError: malformed, or others may read it
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read identity file {file}: {exc.strerror or exc}") from None
    return write_new_identity(file), True


# -- starting a node -----------------------------------------------------------------------


async def check_signaling(urls: Sequence[str], timeout: float) -> list[str]:
    """The signaling servers among ``urls`` that answer like one within ``timeout`` seconds.

    Each is sent nothing: the check opens a WebSocket, waits for the server's
    challenge, and closes. Unreachable servers are reported on stderr when at least
    one answers (the swarm works with any one of them).

    Raises:
        CliError: none of them answered.
    """
    problems: dict[str, str] = {}

    async def probe(url: str) -> None:
        problem = await _probe_signaling(url, timeout)
        if problem is not None:
            problems[url] = problem

    async with anyio.create_task_group() as tg:
        for url in dict.fromkeys(urls):
            tg.start_soon(probe, url)
    reachable = [url for url in dict.fromkeys(urls) if url not in problems]
    if not reachable:
        url, problem = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CliError(f"signaling server {url}: {problem}{more}")
    for url, problem in problems.items():
        click.echo(f"crdtswarm: warning: signaling server {url}: {problem}", err=True)
    return reachable


async def _probe_signaling(url: str, timeout: float) -> str | None:
    """None when ``url`` is a signaling server that answers, else what is wrong."""
    try:
        with anyio.fail_after(timeout):
            async with connect(
                url, open_timeout=None, compression=None, proxy=None, user_agent_header=None
            ) as ws:
                first = await ws.recv()
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except InvalidURI:
        return "not a WebSocket URL (expected ws://host:port or wss://host:port)"
    except OSError as exc:
        return f"unreachable ({exc.strerror or exc})"
    except WebSocketException as exc:
        return f"not a signaling server ({exc})"
    if not (isinstance(first, bytes) and first[:1] == bytes((FrameType.CHALLENGE,))):
        return "not a crdtswarm signaling server (no challenge)"
    return None


SWARM_KEY_ENV = "CRDTSWARM_SWARM_KEY"
SWARM_KEY_HELP = (
    "The private swarm's key: 64 hex digits (see 'crdtswarm key swarm'); nodes without "
    f"the same key cannot link. Better in the {SWARM_KEY_ENV} environment variable than "
    "on a command line others can see."
)


def parse_swarm_key(text: str | None) -> bytes | None:
    """Parse a ``--swarm-key`` value (64 hex digits) into 32 bytes; None when not given.

    Raises:
        CliError: if it is not 64 hex digits.
    """
    if text is None or not text.strip():
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CliError("--swarm-key: expected 64 hex digits (32 bytes); see 'crdtswarm key swarm'")
    return key


def parse_announce(text: str) -> str:
    """Parse an ``--announce`` value, ``HOST:PORT`` or ``tcp://HOST:PORT``, into an address.

    Raises:
        CliError: if it is neither.
    """
    address = text if text.startswith("tcp://") else f"tcp://{text}"
    try:
        parse_address(address)
    except ValueError:
        raise CliError(f"--announce {text!r}: expected HOST:PORT, e.g. 203.0.113.5:4242") from None
    return address


def build_swarm(
    *,
    identity: Identity | None,
    listen: tuple[str, int],
    webrtc: bool,
    stun: Sequence[str],
    signaling: Sequence[str],
    announce: Sequence[str] = (),
    swarm_key: bytes | None = None,
    data_dir: str | None = None,
    config: SwarmConfig | None = None,
) -> Swarm:
    """A `Swarm` (not started) with a TCP transport on ``listen`` and maybe WebRTC.

    Raises:
        CliError: an option value the library refuses, or a data directory that
            cannot be used (not creatable, its identity or document store damaged).
    """
    transports: list[Transport] = [TcpTransport(*listen, announce=announce)]
    try:
        if webrtc:
            transports.insert(0, WebRTCTransport(ice_servers=list(stun)))
        return Swarm(
            identity=identity,
            transports=transports,
            signaling=list(signaling),
            swarm_key=swarm_key,
            data_dir=data_dir,
            config=config,
        )
    except ValueError as exc:  # a bad STUN URL, an unreadable data_dir identity
        raise CliError(str(exc)) from None
    except OSError as exc:  # the data directory cannot be created or opened
        raise CliError(f"data directory {data_dir}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:  # its document store is damaged (or not one)
        raise CliError(f"data directory {data_dir}: document store: {exc}") from None


@contextlib.contextmanager
def listen_errors(listen: tuple[str, int]) -> Iterator[None]:
    """Turn the errors of a listener that cannot start on ``listen`` into a `CliError`.

    Those are: the address is in use or not this machine's, the port needs
    privileges, the host name is unknown. Other errors pass through.
    """
    try:
        yield
    except OSError as exc:
        if not (isinstance(exc, socket.gaierror) or exc.errno in _LISTEN_ERRNOS):
            raise
        host, port = listen
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        code = exc.errno or 0  # getaddrinfo's codes are negative
        reason = os.strerror(code) if code > 0 else exc.strerror or str(exc)
        raise CliError(f"cannot listen on {where}: {reason}") from exc


class WrongKeyError(CliError):
    """Raised by `join` when the node at the address proved another key than the one given."""


async def join(swarm: Swarm, target: JoinTarget, timeout: float) -> Peer:
    """Link to the member ``target`` within ``timeout`` seconds and return its `Peer`.

    Raises:
        CliError: the member could not be reached, proved another key than the
            one given (a wrong key in ``--join``), or took too long.
    """
    try:
        return await swarm.call(target.key, target.address, timeout=timeout)
    except TimeoutError:
        raise CliError(f"could not join {target}: no link within {timeout:g} s") from None
    except ConnectError as exc:
        cause = exc.__cause__
        if isinstance(cause, IdentityMismatchError):
            raise WrongKeyError(
                f"could not join {target}: the node at {target.address} has the key "
                f"{cause.actual}, not {target.key.short}... (check the key in --join)"
            ) from None
        if isinstance(cause, HandshakeError) and "swarm key" in str(cause):
            raise CliError(
                f"could not join {target}: the handshake failed: wrong or missing swarm key "
                f"(both nodes need the same --swarm-key / {SWARM_KEY_ENV})"
            ) from None
        raise CliError(f"could not join {target}: {_reason(exc)}") from None


def _reason(error: ConnectError) -> str:
    """What a `ConnectError` from `Swarm.call` says, without the "could not link" prefix."""
    text = str(error)
    prefix, sep, rest = text.partition(": ")
    return rest if sep and prefix.startswith("could not link") else text


@contextlib.contextmanager
def unwrapped_errors() -> Iterator[None]:
    """Re-raise the one error inside nested single-error groups (anyio task groups wrap).

    The command line's error policy (`crdtswarm.cli.app.main`) then sees the error
    itself: a `CliError` or `OSError` is printed as one line, not as a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from error.__cause__


# -- running until a signal ----------------------------------------------------------------


class Lifetime:
    """A long-lived command's view of SIGINT and SIGTERM (see `run_until_signal`).

    Before `set_ready`, a signal abandons the start (the command's task is
    cancelled); after it, the first signal sets `stopping` and the command shuts
    down in its own time; a second one cancels it (`forced`).
    """

    def __init__(self) -> None:
        self.stopping = anyio.Event()
        self.forced = False
        self._ready = False

    @property
    def is_ready(self) -> bool:
        """Whether the command has started (signals now ask it to stop)."""
        return self._ready

    def set_ready(self) -> None:
        """Mark the start as done: from now on a signal sets `stopping`."""
        self._ready = True


async def run_until_signal(main: Callable[[Lifetime], Awaitable[None]]) -> Lifetime:
    """Run ``main(lifetime)`` with SIGINT and SIGTERM delivered through ``lifetime``.

    Returns the lifetime when ``main`` returned, or was cancelled by a signal.
    """
    lifetime = Lifetime()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                async for _ in signals:
                    if lifetime.is_ready and not lifetime.stopping.is_set():
                        lifetime.stopping.set()
                        continue
                    lifetime.forced = lifetime.is_ready
                    tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await main(lifetime)
            tg.cancel_scope.cancel()
    return lifetime
