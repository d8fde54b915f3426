"""CRDT replication (Yjs sync protocol, replicas, the directory)."""
