"""The node's TLS material is taken up again when renewed on disk (node/tls.py)."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from itmolink.crypto.pki import PartyFiles, init_party, renew_node_certificate
from itmolink.node.tls import NodeTls

NOW = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)


@pytest.fixture
def lao(tmp_path: Path) -> PartyFiles:
    return init_party(tmp_path / "lao", "LAO", "LAO-NR", now=NOW)


def renew(files: PartyFiles) -> x509.Certificate:
    return renew_node_certificate(
        ca_certificate=files.ca_certificate, ca_key=files.ca_key,
        node_certificate=files.node_certificate, node_key=files.node_key, hosts=None, now=NOW,
    )  # fmt: skip


def serial(tls: NodeTls) -> int:
    return x509.load_pem_x509_certificate(tls.certificate).serial_number


def test_a_renewed_pair_is_served_from_the_next_handshake(lao: PartyFiles) -> None:
    tls = NodeTls(lao.node_key, lao.node_certificate, lao.ca_certificate.read_bytes())
    tls.server_credentials()
    first = serial(tls)
    assert tls.server_config() is None  # unchanged: gRPC keeps what it has
    assert tls.reload() is False
    new = renew(lao)
    config = tls.server_config()
    assert config is not None
    assert tls.generation == 2
    assert serial(tls) == new.serial_number != first
    assert tls.not_after == new.not_valid_after_utc
    assert tls.key == lao.node_key.read_bytes()
    assert tls.server_config() is None  # handed over once


def test_a_key_without_its_certificate_is_not_taken(
    lao: PartyFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = NodeTls(lao.node_key, lao.node_certificate, None)
    kept = (tls.key, tls.certificate)
    other = init_party(tmp_path / "other", "LAO", "LAO-NR", now=NOW)
    # As between the two renames of a renewal: the new key, the old certificate.
    shutil.copy2(other.node_key, lao.node_key)
    with caplog.at_level(logging.WARNING, logger="itmolink.node.tls"):
        assert tls.reload() is False
        assert tls.reload() is False  # said once, not at every handshake
    assert (tls.key, tls.certificate) == kept
    assert tls.generation == 1
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1
    shutil.copy2(other.node_certificate, lao.node_certificate)
    assert tls.reload() is True
    assert (tls.key, tls.certificate) == (
        other.node_key.read_bytes(),
        other.node_certificate.read_bytes(),
    )


def test_a_mismatched_pair_at_start_is_refused(lao: PartyFiles, tmp_path: Path) -> None:
    other = init_party(tmp_path / "other", "LAO", "LAO-NR", now=NOW)
    with pytest.raises(ValueError, match="not for the node key"):
        NodeTls(other.node_key, lao.node_certificate, None)


def test_a_private_key_readable_by_others_is_refused(lao: PartyFiles) -> None:
    lao.node_key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        NodeTls(lao.node_key, lao.node_certificate, None)
