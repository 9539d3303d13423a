"""The sans-IO core: unit blocks, Article 6 rules, the transfer state machine.

Nothing in this package performs I/O, reads a clock or draws randomness; time
and identifiers are passed in by the caller. It does not import grpc, SQL
drivers or generated protobuf code.
"""
