"""crdtswarm: a peer-to-peer swarm with end-to-end encrypted links and Yjs CRDT replication.

Start with `Swarm`::

    async with Swarm(transports=[TcpTransport()]) as node:
        peer = await node.call(other_key, address="tcp://127.0.0.1:4242")
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
from crdtswarm.swarm import (
    PeerConnected,
    PeerDisconnected,
    Swarm,
    SwarmConfig,
    SwarmEvent,
    SwarmStatistics,
)
from crdtswarm.sync.directory import Member, MemberJoined, MemberLeft

__all__ = [
    "ConnectError",
    "CrdtSwarmError",
    "ErrorCode",
    "HandshakeError",
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
    "RpcError",
    "RpcTimeoutError",
    "Stream",
    "StreamResetError",
    "Swarm",
    "SwarmConfig",
    "SwarmEvent",
    "SwarmStatistics",
]
