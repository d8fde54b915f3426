"""Signaling servers and clients (rendezvous by public key)."""
