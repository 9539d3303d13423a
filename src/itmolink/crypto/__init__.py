"""Signed envelopes, Ed25519 signing keys and the X.509 material for mutual TLS."""
