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


def node_tls(files: PartyFiles, roots: bytes | None = None) -> NodeTls:
    return NodeTls(
        files.node_key, files.node_certificate, roots, own_ca=files.ca_certificate.read_bytes()
    )


def same_ca_pair(files: PartyFiles, where: Path) -> PartyFiles:
    """Another key and certificate from the same CA (a renewal made elsewhere)."""
    shutil.copytree(files.directory, where)
    other = PartyFiles(where)
    renew(other)
    return other


def serial(tls: NodeTls) -> int:
    return x509.load_pem_x509_certificate(tls.certificate).serial_number


def test_a_renewed_pair_is_served_from_the_next_handshake(lao: PartyFiles) -> None:
    tls = node_tls(lao, lao.ca_certificate.read_bytes())
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
    tls = node_tls(lao)
    kept = (tls.key, tls.certificate)
    other = same_ca_pair(lao, tmp_path / "other")
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
    other = same_ca_pair(lao, tmp_path / "other")
    with pytest.raises(ValueError, match="not for the node key"):
        NodeTls(other.node_key, lao.node_certificate, None, own_ca=lao.ca_certificate.read_bytes())


def test_a_pair_from_another_ca_is_not_taken(lao: PartyFiles, tmp_path: Path) -> None:
    """A matching pair that partners would refuse (another CA) is kept out."""
    tls = node_tls(lao)
    foreign = init_party(tmp_path / "foreign", "LAO", "LAO-NR", now=NOW)
    shutil.copy2(foreign.node_key, lao.node_key)
    shutil.copy2(foreign.node_certificate, lao.node_certificate)
    assert tls.reload() is False
    assert tls.generation == 1
    with pytest.raises(ValueError, match="not issued by this party's CA"):
        node_tls(lao)  # and at start-up it stops the node


def test_a_private_key_readable_by_others_is_refused(lao: PartyFiles) -> None:
    lao.node_key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        node_tls(lao)
