"""Carrying WebRTC signals between nodes: sealed, signed, and over every way there is.

`SignalRouter` is the `crdtswarm.transport.webrtc.Signaler` a `crdtswarm.Swarm`
gives its WebRTC transports. A signal (an offer or an answer, opaque here) is sealed
to the recipient and signed by us with `crdtswarm.protocol.signal.seal_signal`, so
nothing that carries it can read, alter, forge or replay it. It then travels every
way available at once:

1. through the swarm: an RPC (`FORWARD_METHOD`) to the recipient when it is linked
   to us, else to the linked peers that can reach it in one hop (those whose
   latency row lists it, those through which a signal from it reached us lately,
   or, knowing none, a few at random; up to ``max_forwarders``); a peer forwards
   only to a node linked to it;
2. through every connected signaling server (`crdtswarm.signaling.SignalingClient`);
3. through the directory (`crdtswarm.sync.directory.Directory.post_signal`), when
   no peer took it and the recipient is a member (a server may not know the
   recipient, and says so only later): it reaches the recipient wherever it is in
   the swarm, a little later.

So once a node is in the swarm, the signaling servers can all go down: signals to
other members still arrive. Incoming signals from any of these ways are opened
(`open_signal`: the replay cache also drops the copies that came by another way)
and handed to ``deliver`` with the sender's proven key.

Bounds: signals up to ``MAX_SIGNAL_SIZE``; at most ``max_concurrent_forwards``
forwards for others at once (more are refused); the replay cache and the table of
recent paths are bounded.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio

from crdtswarm.errors import (
    ConnectError,
    ErrorCode,
    FrameError,
    RemoteProtocolError,
    RpcError,
)
from crdtswarm.identity import KEY_SIZE, InvalidKeyError, PublicKey
from crdtswarm.protocol.signal import MAX_SIGNAL_SIZE, ReplayCache, open_signal, seal_signal

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from crdtswarm.identity import Identity
    from crdtswarm.peer import Peer
    from crdtswarm.signaling.client import SignalingClient
    from crdtswarm.sync.directory import Directory

__all__ = ["FORWARD_METHOD", "SignalConfig", "SignalRouter", "SignalStatistics"]

logger = logging.getLogger(__name__)

FORWARD_METHOD: Final = "crdtswarm.signal"
"""The RPC method that carries a sealed signal: recipient key (32 bytes) + signal."""
_MAX_PATHS: Final = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class SignalConfig:
    """Timing and limits of signal delivery."""

    signal_ttl: float = 60.0
    """Seconds a signal stays valid (60)."""
    forward_timeout: float = 5.0
    """Seconds a forwarding RPC may take (5)."""
    max_forwarders: int = 3
    """Linked peers asked to forward one signal (3)."""
    max_concurrent_forwards: int = 32
    """Forwards for others in progress at once; more are refused (32)."""
    replay_cache_size: int = 4096
    """Signal ids remembered against replays (4096)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SignalStatistics:
    """Counters of a `SignalRouter` since it started."""

    sent: int
    """Signals we sealed and sent."""
    delivered: int
    """Signals opened and handed on (each once, whichever way it came)."""
    rejected: int
    """Signals that failed to open: forged, altered, expired, replayed or not ours."""
    forwarded: int
    """Signals we forwarded for others to one of our peers."""
    via_directory: int
    """Signals we left in the directory because no faster way took them."""


class SignalRouter:
    """Seals, sends, forwards and opens signals for one node (see the module docstring).

    Args:
        identity: our keypair (seals and signs; opens what is sealed to us).
        deliver: called with (sender, payload) for every signal that opens.
        peers: returns the peers linked to us now.
        directory: returns the directory (None before it exists).
        rows: returns the members' latency rows (author -> peer -> seconds), as
            the swarm last read them from the directory.
        client: the signaling servers' client, if any.
        config: timing and limits.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        deliver: Callable[[PublicKey, bytes], None],
        peers: Callable[[], Mapping[PublicKey, Peer]],
        directory: Callable[[], Directory | None],
        rows: Callable[[], Mapping[PublicKey, Mapping[PublicKey, float]]] = dict,
        client: SignalingClient | None = None,
        config: SignalConfig | None = None,
    ) -> None:
        self._identity = identity
        self._me = identity.public_key
        self._deliver = deliver
        self._peers = peers
        self._directory = directory
        self._rows = rows
        self._client = client
        self._config = config or SignalConfig()
        self._replay = ReplayCache(self._config.replay_cache_size)
        self._paths: OrderedDict[PublicKey, PublicKey] = OrderedDict()  # sender -> via
        self._seen_posts: dict[tuple[PublicKey, int], float] = {}
        self._forwards = anyio.Semaphore(self._config.max_concurrent_forwards)
        self._counts = dict.fromkeys(
            ("sent", "delivered", "rejected", "forwarded", "via_directory"), 0
        )

    def statistics(self) -> SignalStatistics:
        """A snapshot of the counters."""
        return SignalStatistics(**self._counts)

    # -- sending -------------------------------------------------------------------------

    async def send_signal(self, remote_key: PublicKey, payload: bytes) -> None:
        """Seal ``payload`` to ``remote_key`` and send it every way available.

        Raises:
            ConnectError: if no way took it (no peer, no server, no directory).
        """
        sealed = seal_signal(
            self._identity, remote_key, payload, now=time.time(), ttl=self._config.signal_ttl
        )
        self._counts["sent"] += 1
        message = bytes(remote_key) + sealed
        taken = on_server = False

        async def through_peer(peer: Peer, scope: anyio.CancelScope) -> None:
            nonlocal taken
            try:
                await peer.rpc(FORWARD_METHOD, message, timeout=self._config.forward_timeout)
            except (RpcError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                logger.debug("signal to %s via %s failed: %s", remote_key.short, peer, exc)
            else:
                taken = True
                scope.cancel()  # delivered: do not wait for servers that may be down

        async def through_servers(client: SignalingClient) -> None:
            nonlocal on_server
            try:
                await client.send(remote_key, sealed)
            except ConnectError as exc:
                logger.debug("signal to %s: no signaling server: %s", remote_key.short, exc)
            else:
                on_server = True  # handed to a server, which may not know the recipient

        async with anyio.create_task_group() as tg:
            for peer in self._forwarders(remote_key):
                tg.start_soon(through_peer, peer, tg.cancel_scope)
            if self._client is not None:
                tg.start_soon(through_servers, self._client)
        if taken:
            return
        directory = self._directory()
        if directory is not None and remote_key in directory.members:
            directory.post_signal(remote_key, sealed, ttl=self._config.signal_ttl)
            self._counts["via_directory"] += 1
        elif not on_server:
            raise ConnectError(f"no way to send a signal to {remote_key.short}")

    def _forwarders(self, remote_key: PublicKey) -> list[Peer]:
        peers = self._peers()
        direct = peers.get(remote_key)
        if direct is not None:
            return [direct]
        chosen: list[Peer] = []
        via = self._paths.get(remote_key)
        if via is not None and via in peers:
            chosen.append(peers[via])
        for author, row in self._rows().items():
            if remote_key in row and author in peers and peers[author] not in chosen:
                chosen.append(peers[author])
        if not chosen:  # nobody known to reach it: ask a few peers, who refuse fast
            chosen = random.sample(
                list(peers.values()), min(len(peers), self._config.max_forwarders)
            )
        return chosen[: self._config.max_forwarders]

    # -- receiving -----------------------------------------------------------------------

    async def handle_forward(self, payload: bytes, remote_key: PublicKey) -> bytes:
        """The RPC handler of `FORWARD_METHOD`: a signal for us, or for a peer of ours.

        Raises:
            RpcError: REFUSED when the recipient is not linked to us or too many
                forwards are in progress; FRAME_ERROR on a malformed request.
        """
        if len(payload) <= KEY_SIZE or len(payload) > KEY_SIZE + MAX_SIGNAL_SIZE:
            raise RpcError(ErrorCode.FRAME_ERROR, "not a signal")
        try:
            recipient = PublicKey(payload[:KEY_SIZE])
        except InvalidKeyError as exc:
            raise RpcError(ErrorCode.FRAME_ERROR, "not a key") from exc
        if recipient == self._me:
            self.receive(payload[KEY_SIZE:], via=remote_key)
            return b""
        peer = self._peers().get(recipient)
        if peer is None or recipient == remote_key:
            raise RpcError(ErrorCode.REFUSED, "not linked to the recipient")
        if self._forwards.value == 0:
            raise RpcError(ErrorCode.REFUSED, "too many forwards")
        async with self._forwards:
            try:
                await peer.rpc(FORWARD_METHOD, payload, timeout=self._config.forward_timeout)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise RpcError(ErrorCode.REFUSED, "the recipient went away") from exc
        self._counts["forwarded"] += 1
        return b""

    def receive(self, sealed: bytes, *, via: PublicKey | None = None) -> None:
        """Open a signal that reached us (from a peer, a server or the directory)."""
        try:
            opened = open_signal(self._identity, sealed, now=time.time(), replay=self._replay)
        except (FrameError, RemoteProtocolError) as exc:
            self._counts["rejected"] += 1
            logger.debug("dropped a signal: %s", exc)
            return
        if via is not None and via != opened.sender:  # answer the same way
            self._paths.pop(opened.sender, None)
            self._paths[opened.sender] = via
            while len(self._paths) > _MAX_PATHS:
                self._paths.popitem(last=False)
        self._counts["delivered"] += 1
        self._deliver(opened.sender, opened.payload)

    def poll_directory(self) -> None:
        """Open the signals left for us in the directory that we have not read yet."""
        directory = self._directory()
        if directory is None:
            return
        now = time.time()
        self._seen_posts = {k: t for k, t in self._seen_posts.items() if t > now}
        for signal in directory.signals_for():
            key = (signal.author, signal.seq)
            if key not in self._seen_posts and signal.payload:
                self._seen_posts[key] = signal.expires_at
                self.receive(signal.payload)

    async def run(self) -> None:
        """Read what the signaling servers bring until cancelled; run it in a task."""
        if self._client is None:
            return
        async for blob in self._client:
            self.receive(blob)
