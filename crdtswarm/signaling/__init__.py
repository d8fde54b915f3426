"""Signaling servers and clients: rendezvous by public key for sealed signals.

`SignalingServer` forwards opaque blobs between clients registered under their
public keys; `SignalingClient` keeps a registered connection to each of several
servers. The blobs are signals sealed with `crdtswarm.protocol.signal.seal_signal`,
so a server can neither read, forge, nor usefully alter, replay or redirect them.
The wire protocol is described in `crdtswarm.signaling.server`.
"""

from __future__ import annotations

from crdtswarm.signaling.client import (
    SignalingClient,
    SignalingClientConfig,
    SignalingClientStatistics,
)
from crdtswarm.signaling.server import (
    SignalingServer,
    SignalingServerConfig,
    SignalingServerStatistics,
)

__all__ = [
    "SignalingClient",
    "SignalingClientConfig",
    "SignalingClientStatistics",
    "SignalingServer",
    "SignalingServerConfig",
    "SignalingServerStatistics",
]
