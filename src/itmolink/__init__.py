"""itmolink: a registry node for bilateral Article 6 ITMO transfers."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
