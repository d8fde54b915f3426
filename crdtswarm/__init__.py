"""crdtswarm: a peer-to-peer swarm with end-to-end encrypted links and Yjs CRDT replication."""

from crdtswarm.identity import Identity, PublicKey

__all__ = ["Identity", "PublicKey"]
