"""crdtswarm: a peer-to-peer swarm with end-to-end encrypted links and Yjs CRDT replication.

Start with `Swarm`::

    async with Swarm(signaling=["ws://127.0.0.1:8765"]) as node:  # WebRTC + TCP
        peer = await node.call(other_key)  # by key; or address="tcp://127.0.0.1:4242"
        rtt = await peer.ping()
"""

from crdtswarm.errors import (
    ConnectError,
    CrdtSwarmError,
    ErrorCode,
    HandshakeError,
    IdentityMismatchError,
    ProtocolError,
    RpcError,
    RpcTimeoutError,
    StreamResetError,
)
from crdtswarm.identity import Identity, IdentityFileError, InvalidKeyError, PublicKey
from crdtswarm.mux import MuxStream as Stream
from crdtswarm.peer import Peer, PeerStatistics
from crdtswarm.protocol.routing import Route
from crdtswarm.relay import RelayConfig
from crdtswarm.signaling import SignalingServer
from crdtswarm.swarm import (
    PeerConnected,
    PeerDisconnected,
    Swarm,
    SwarmConfig,
    SwarmEvent,
    SwarmStatistics,
)
from crdtswarm.sync.directory import Member, MemberJoined, MemberLeft
from crdtswarm.transport.tcp import TcpTransport
from crdtswarm.transport.webrtc import IceServer, WebRTCTransport

__all__ = [
    "ConnectError",
    "CrdtSwarmError",
    "ErrorCode",
    "HandshakeError",
    "IceServer",
    "Identity",
    "IdentityFileError",
    "IdentityMismatchError",
    "InvalidKeyError",
    "Member",
    "MemberJoined",
    "MemberLeft",
    "Peer",
    "PeerConnected",
    "PeerDisconnected",
    "PeerStatistics",
    "ProtocolError",
    "PublicKey",
    "RelayConfig",
    "Route",
    "RpcError",
    "RpcTimeoutError",
    "SignalingServer",
    "Stream",
    "StreamResetError",
    "Swarm",
    "SwarmConfig",
    "SwarmEvent",
    "SwarmStatistics",
    "TcpTransport",
    "WebRTCTransport",
]
