"""`itmolink pki renew` on a running node: no restart, partners need nothing new."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509

from itmolink.cli.main import main
from itmolink.core.transfer import TransferState

from .conftest import Registry, eventually, running_pair
from .test_transfer import issued, transfer

COMPLETED = TransferState.COMPLETED.value
METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'


def served_certificate(registry: Registry, client: Registry) -> x509.Certificate:
    """The certificate ``registry``'s partner port presents to a new connection
    from ``client`` (mutual TLS, as gRPC does it)."""
    context = ssl.create_default_context(cafile=str(registry.keys.ca_certificate))
    context.load_cert_chain(str(client.keys.node_certificate), str(client.keys.node_key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", registry.node.partner_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def on_disk(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
async def lao_kor_metrics(pki: Callable[..., Path]) -> AsyncIterator[tuple[Registry, Registry]]:
    async with running_pair(pki, lao_extra=METRICS) as pair:
        yield pair


async def test_a_renewed_certificate_is_served_and_used_without_a_restart(
    lao_kor_metrics: tuple[Registry, Registry],
) -> None:
    lao, kor = lao_kor_metrics
    authorisation_id = await issued(lao)
    before = await transfer(lao, authorisation_id, 1_000)
    await eventually(lambda: _completed(kor, before))
    old = on_disk(lao.keys.node_certificate)
    assert (await asyncio.to_thread(served_certificate, lao, kor)) == old

    assert main(["pki", "renew", "--config", str(lao.config_path)]) == 0
    new = on_disk(lao.keys.node_certificate)
    assert new.serial_number != old.serial_number

    # A new connection to LAO gets the new certificate at once.
    assert (await asyncio.to_thread(served_certificate, lao, kor)) == new
    assert lao.node.tls.serial == new.serial_number
    # LAO dials KOR anew with it: KOR sees the new certificate on LAO's next message,
    # and the transfer completes on both sides.
    after = await transfer(lao, authorisation_id, 2_000)
    await eventually(lambda: _completed(kor, after))
    await eventually(lambda: _completed(lao, after))
    # (KOR remembers the party of each client certificate it has seen.)
    seen = [x509.load_pem_x509_certificate(pem).serial_number for pem in kor.node._peers]
    assert new.serial_number in seen
    # The metric follows the certificate in use.
    expiry = await asyncio.to_thread(
        lao.node.metrics.registry.get_sample_value,
        "itmolink_node_certificate_expiry_timestamp_seconds",
    )
    assert expiry == new.not_valid_after_utc.timestamp()
    assert await lao.held() == 100_000 - 3_000


async def _completed(registry: Registry, transfer_id: str) -> bool:
    view = (await registry.transfers()).get(transfer_id)
    return view is not None and view.state == COMPLETED
