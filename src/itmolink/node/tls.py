"""The node's TLS key and certificate, taken up again when renewed on disk.

``itmolink pki renew`` replaces ``node.key`` and ``node.pem`` (each by a rename,
the key first). A running node notices the change without a restart:

* the partner port's server credentials ask :meth:`NodeTls.server_config` at
  every new TLS handshake, which looks at the two files (a ``stat`` each) and
  hands gRPC the new pair once both are there and match;
* the node's own connections to partners are made again with the new pair
  (``Node._stub`` compares :attr:`NodeTls.generation`), and the outbox worker
  looks at the files at least once a second, so that happens even while no
  partner connects.

Connections already open keep the certificate they were opened with. A pair that
would not work is not taken: a key and certificate that do not match (caught
between the two renames, or a mistake), a certificate not issued by the party's
own CA (the one partners pin) or not valid now. The node keeps the pair it has
and says so in its log; at start-up such a pair stops the node.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path

import grpc

from itmolink.crypto.keys import check_private_file
from itmolink.crypto.pki import check_node_certificate

log = logging.getLogger(__name__)


class NodeTls:
    """The TLS key and certificate the node serves and dials with."""

    def __init__(
        self,
        key_path: Path,
        certificate_path: Path,
        client_roots: bytes | None,
        *,
        own_ca: bytes,
    ) -> None:
        self._key_path = key_path
        self._certificate_path = certificate_path
        self._client_roots = client_roots
        self._own_ca = own_ca
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._refused: tuple[tuple[int, int, int], ...] | None = None
        self._served = 0
        self.generation = 0
        self.key = b""
        self.certificate = b""
        self.not_after = dt.datetime.min.replace(tzinfo=dt.UTC)
        self.serial = 0
        if not self.reload():
            raise ValueError(f"cannot load the node key {key_path} and {certificate_path}")

    def _stamp_of_files(self) -> tuple[tuple[int, int, int], ...]:
        stats = (self._key_path.stat(), self._certificate_path.stat())
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def reload(self) -> bool:
        """Take up the files if they changed since last read and are a matching pair;
        whether a new pair was taken. At the first load a bad pair raises."""
        with self._lock:
            first = self.generation == 0
            try:
                stamp = self._stamp_of_files()
                if stamp in (self._stamp, self._refused):
                    return False
                check_private_file(self._key_path)
                key = self._key_path.read_bytes()
                certificate_pem = self._certificate_path.read_bytes()
                certificate = check_node_certificate(
                    key, certificate_pem, ca_pem=self._own_ca, now=dt.datetime.now(dt.UTC)
                )
            except (OSError, ValueError) as exc:
                if first:
                    raise
                if stamp != self._refused:
                    log.warning(
                        "the node key or certificate on disk cannot be used (%s); "
                        "keeping the certificate with serial %x",
                        exc,
                        self.serial,
                    )
                self._refused = stamp
                return False
            self._stamp = stamp
            self.key, self.certificate = key, certificate_pem
            self.not_after = certificate.not_valid_after_utc
            self.serial = certificate.serial_number
            self.generation += 1
        if not first:
            log.info(
                "took up the renewed node certificate (serial %x, valid until %s)",
                self.serial,
                f"{self.not_after:%Y-%m-%d}",
            )
        return True

    def _config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.certificate)], root_certificates=self._client_roots
        )

    def server_config(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each new handshake: the pair to use, when it changed."""
        try:
            self.reload()
        except Exception:  # never let a bad file break the handshake itself
            log.exception("reading the node certificate failed")
        with self._lock:
            if self._served == self.generation:
                return None
            self._served = self.generation
            return self._config()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials requiring a client certificate from a pinned CA, which
        serve a renewed node certificate from the next handshake on."""
        with self._lock:
            self._served = self.generation
            initial = self._config()
        # gRPC documents None from the fetcher as "unchanged"; its type stubs do not.
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self.server_config,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    def channel_credentials(self, root_certificates: bytes) -> grpc.ChannelCredentials:
        with self._lock:
            return grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=self.key,
                certificate_chain=self.certificate,
            )
