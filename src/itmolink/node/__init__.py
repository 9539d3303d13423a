"""The running registry node: protocol engine, gRPC services, outbox worker."""
