"""What a node checks before it serves: where its admin interface may listen, the
mode of its admin socket (and what may be at its path), an operator to act through,
private keys readable by the node's user only; the validity windows of the keys a
card pins; the node's own card as keys are rotated and revoked; and the gRPC cap on
a request's size, before the node reads it."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.crypto.envelope import TrustStore, open_envelope, seal
from itmolink.crypto.keys import SigningKey
from itmolink.crypto.operators import operators_file
from itmolink.crypto.pki import PartnerCard
from itmolink.node.config import ConfigError, load_config
from itmolink.node.runtime import Node

from .conftest import NOW, start_registry, stop_registry
from .test_cli import cli, rotated


def _with_admin(config: Path, admin_listen: str) -> Path:
    lines = [
        f'admin_listen = "{admin_listen}"' if line.startswith("admin_listen") else line
        for line in config.read_text().splitlines()
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.parametrize(
    "admin_listen",
    ["0.0.0.0:50061", "[::]:50061", "192.0.2.7:50061", "admin.example:50061", ":50061"],
)
def test_an_admin_listener_that_is_not_local_is_refused(
    pki: Callable[..., Path], admin_listen: str
) -> None:
    config = _with_admin(pki("LAO", ["KOR"]), admin_listen)
    with pytest.raises(ConfigError, match=r"'admin_listen'.*is not local"):
        load_config(config)


@pytest.mark.parametrize(
    "admin_listen", ["127.0.0.1:50061", "127.9.9.9:0", "[::1]:50061", "localhost:50061"]
)
def test_a_loopback_admin_listener_is_accepted_as_written(
    pki: Callable[..., Path], admin_listen: str
) -> None:
    config = _with_admin(pki("LAO", ["KOR"]), admin_listen)
    assert load_config(config).admin_listen == admin_listen


def test_a_relative_admin_socket_is_resolved_against_the_configuration(
    pki: Callable[..., Path], tmp_path: Path
) -> None:
    config = _with_admin(pki("LAO", ["KOR"]), "unix:run/admin.sock")
    expected = (config.parent / "run" / "admin.sock").resolve()
    assert load_config(config).admin_listen == f"unix:{expected}"
    absolute = tmp_path / "elsewhere.sock"
    assert load_config(_with_admin(config, f"unix:{absolute}")).admin_listen == f"unix:{absolute}"


async def test_the_admin_socket_is_for_the_nodes_user_only(pki: Callable[..., Path]) -> None:
    umask = os.umask(0o022)  # a usual umask, which would leave the socket 0755
    try:
        registry = await start_registry(pki("LAO", ["KOR"]))
        try:
            socket = load_config(registry.config_path).admin_listen.removeprefix("unix:")
            assert stat.S_ISSOCK(os.stat(socket).st_mode)
            assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
            assert os.umask(0o022) == 0o022  # the node put the process umask back
        finally:
            await stop_registry(registry)
    finally:
        os.umask(umask)


@pytest.mark.parametrize("target", ["pki/card.toml", "node.toml", "pki"])
async def test_an_admin_socket_path_that_is_not_a_socket_is_left_alone(
    pki: Callable[..., Path], target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo pointing admin_listen at an existing file (the card, the configuration,
    a key, the SQLite database) or directory: the node refuses to start and removes
    nothing; check-config names it. A socket left by an earlier run is replaced."""
    from itmolink.cli.main import main

    config = _with_admin(pki("LAO", ["KOR"]), f"unix:{target}")
    path = config.parent / target
    before = path.read_bytes() if path.is_file() else None
    await _refuses_to_start(config, OSError, "exists and is not a socket", socket_may_exist=True)
    assert path.exists()
    assert before is None or path.read_bytes() == before
    assert main(["node", "check-config", str(config)]) == 1
    assert "exists and is not a socket" in capsys.readouterr().out


async def test_a_socket_left_by_an_earlier_run_is_replaced(pki: Callable[..., Path]) -> None:
    """A node that crashed leaves its socket file behind; the next start replaces it."""
    import socket as sockets

    config = pki("LAO", ["KOR"])
    path = load_config(config).admin_listen.removeprefix("unix:")
    stale = sockets.socket(sockets.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, with nothing listening
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    registry = await start_registry(config)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        await registry.call("ListTransfers", admin_pb2.ListTransfersRequest())
    finally:
        await stop_registry(registry)


async def _refuses_to_start(
    config: Path, error: type[Exception], match: str, *, socket_may_exist: bool = False
) -> None:
    node = Node(load_config(config))
    with pytest.raises(error, match=match):
        await node.start()
    if not socket_may_exist:
        socket = load_config(config).admin_listen.removeprefix("unix:")
        with pytest.raises(FileNotFoundError):  # it never listened
            os.stat(socket)


@pytest.mark.parametrize("how", ["no file", "no operator in it"])
async def test_a_node_without_an_operator_does_not_start(
    pki: Callable[..., Path], how: str
) -> None:
    config = pki("LAO", ["KOR"])
    operators = operators_file(load_config(config).keys.directory)
    if how == "no file":
        operators.unlink()
    else:
        operators.write_text("[operators]\n")
    await _refuses_to_start(config, ValueError, "no admin operator")


@pytest.mark.parametrize("mode", [0o640, 0o604])
@pytest.mark.parametrize("key", ["node_key", "signing_key"])
async def test_a_node_with_a_private_key_others_can_read_does_not_start(
    pki: Callable[..., Path], key: str, mode: int
) -> None:
    config = pki("LAO", ["KOR"])
    path: Path = getattr(load_config(config).keys, key)
    os.chmod(path, mode)
    await _refuses_to_start(config, PermissionError, "must not be readable by group or others")
    os.chmod(path, 0o600)
    registry = await start_registry(config)  # the same files, owner-only, start
    await stop_registry(registry)


# -- partner cards ---------------------------------------------------------------------


def test_a_card_pins_each_keys_validity_window(tmp_path: Path) -> None:
    """The windows written in a card are those a node verifies messages against."""
    from itmolink.crypto.pki import init_party

    files = init_party(tmp_path / "lao", "LAO", "LAO-NR", now=NOW)
    card = PartnerCard.load(files.card)
    old = SigningKey.load("LAO", files.signing_key)
    new = SigningKey.generate("LAO")
    start, end = NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30)
    windowed = PartnerCard(
        card.party, card.registry, card.ca_certificate_pem,
        (old.verifying_key(not_after=start), new.verifying_key(not_before=start, not_after=end)),
    )  # fmt: skip
    files.card.write_text(windowed.to_toml())
    trust = TrustStore(PartnerCard.load(files.card).signing_keys)

    def verify(key: SigningKey, at: dt.datetime) -> RejectionCode | None:
        envelope = seal("itmolink.v1.TransferVoid", b"", key)
        try:
            open_envelope(envelope, trust, at)
        except Rejected as rejected:
            return rejected.code
        return None

    second = dt.timedelta(seconds=1)
    assert verify(old, start - second) is None
    assert verify(old, start + second) is RejectionCode.SIGNING_KEY_EXPIRED
    assert verify(new, start - second) is RejectionCode.SIGNING_KEY_NOT_YET_VALID
    assert verify(new, start + second) is None
    assert verify(new, end + second) is RejectionCode.SIGNING_KEY_EXPIRED


@pytest.mark.parametrize(
    "bound", ['not_before = 2027-01-01T00:00:00', 'not_before = "2027-01-01T00:00:00Z"',
              "not_after = 2027-01-01"],
)  # fmt: skip
def test_a_card_window_without_an_offset_is_refused(tmp_path: Path, bound: str) -> None:
    from itmolink.crypto.pki import init_party

    files = init_party(tmp_path / "lao", "LAO", "LAO-NR", now=NOW)
    files.card.write_text(files.card.read_text() + bound + "\n")
    with pytest.raises(ValueError, match="must be a TOML date-time with an offset"):
        PartnerCard.load(files.card)


def test_a_card_window_that_ends_before_it_starts_is_refused(tmp_path: Path) -> None:
    from itmolink.crypto.pki import init_party

    files = init_party(tmp_path / "lao", "LAO", "LAO-NR", now=NOW)
    files.card.write_text(
        files.card.read_text()
        + "not_before = 2027-01-01T00:00:00Z\nnot_after = 2026-12-31T00:00:00Z\n"
    )
    with pytest.raises(ValueError, match="not_after is not after not_before"):
        PartnerCard.load(files.card)


async def test_the_card_follows_rotation_and_revocation_of_the_nodes_keys(
    pki: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``itmolink keys rotate`` adds the new key to card.toml valid from the node's
    clock minus max_clock_skew (as the KeyRotation announces it), and ``itmolink
    keys revoke`` takes the old key out of its signing keys."""
    from .conftest import link

    lao = await start_registry(pki("LAO", ["KOR"], extra="[limits]\nmax_clock_skew_seconds = 90\n"))
    kor = await start_registry(pki("KOR", ["LAO"]))
    link(lao, kor)
    try:
        rotated_at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=5)
        lao.node.clock = lambda: rotated_at
        old = lao.node.engine.signing_key.key_id
        new = await rotated(capsys, lao)
        card = PartnerCard.load(lao.keys.card)
        windows = {k.key_id: (k.not_before, k.not_after) for k in card.signing_keys}
        assert windows == {old: (None, None), new: (rotated_at - dt.timedelta(seconds=90), None)}
        # KOR pinned the same window from the announcement.
        pinned = kor.node.engine.trust.get(new)
        assert pinned is not None
        assert pinned.not_before == rotated_at - dt.timedelta(seconds=90)

        code, _, err = await cli(
            capsys, "keys", "revoke", "--config", str(lao.config_path), "--key-id", old
        )
        assert code == 0, err
        card = PartnerCard.load(lao.keys.card)
        assert [k.key_id for k in card.signing_keys] == [new]
        assert [r.key_id for r in card.revoked_keys] == [old]  # listed as revoked instead
    finally:
        await stop_registry(lao)
        await stop_registry(kor)


async def test_grpc_refuses_a_request_far_above_the_envelope_limit(
    pki: Callable[..., Path],
) -> None:
    """An envelope above limits.max_message_bytes gets a signed 2007 from the node
    (D1b); gRPC itself refuses a request more than 1 KiB above it before the node
    reads anything (`grpc.max_receive_message_length`)."""
    import grpc

    from .conftest import PartnerClient, running_pair
    from .test_transfer import code_of, reply_rejection

    limit = 8_192
    async with running_pair(pki, lao_extra=f"[limits]\nmax_message_bytes = {limit}\n") as (
        lao,
        kor,
    ):
        client = PartnerClient(lao, kor.keys, lao.keys.ca_certificate.read_bytes())
        try:
            reply = await client.deliver(b"\x00" * (limit + 100))
            assert code_of(reply_rejection(reply, lao)) is RejectionCode.MESSAGE_TOO_LARGE
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.deliver(b"\x00" * (limit + 1_024 + 100))
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await client.close()
