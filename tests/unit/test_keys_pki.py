"""Signing keys, private key files, party key material and partner cards."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from itmolink.crypto.keys import (
    PRIVATE_FILE_MODE,
    SigningKey,
    VerifyingKey,
    check_private_file,
    key_id_for,
    write_private_file,
)
from itmolink.crypto.pki import (
    CA_VALIDITY,
    NODE_VALIDITY,
    PartnerCard,
    PartyFiles,
    certificate_hosts,
    check_node_certificate,
    check_party_code,
    init_party,
    issuing_party,
    renew_node_certificate,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
PRIVATE_FILES = ("ca.key", "node.key", "signing.key")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PartyFiles]:
    """LAO, KOR and JPN, plus a second "LAO" with its own CA (an impostor)."""
    root = tmp_path_factory.mktemp("parties")
    made = {
        party: init_party(root / party, party, f"{party}-NR", now=NOW)
        for party in ("LAO", "KOR", "JPN")
    }
    made["LAO-impostor"] = init_party(root / "impostor", "LAO", "LAO-NR", now=NOW)
    return made


# key ids and keys


def test_key_id_names_party_and_digest() -> None:
    public = bytes(range(32))
    key_id = key_id_for("LAO", public)
    assert re.fullmatch(r"LAO-ed25519-[0-9a-f]{16}", key_id)
    assert key_id_for("LAO", public) == key_id
    assert key_id_for("KOR", public) != key_id
    assert key_id_for("LAO", bytes(32)) != key_id


def test_signing_key_signs_and_its_verifying_key_verifies() -> None:
    key = SigningKey.generate("LAO")
    public = key.verifying_key()
    assert (public.party, public.key_id) == ("LAO", key.key_id)
    assert public.key_id == key_id_for("LAO", public.public_bytes)
    sig = key.sign(b"message")
    assert public.verify(sig, b"message")
    assert not public.verify(sig, b"messagE")
    assert not SigningKey.generate("LAO").verifying_key().verify(sig, b"message")


def test_signing_key_repr_hides_the_private_key() -> None:
    key = SigningKey.generate("LAO")
    raw = key._private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem = key.private_pem()
    pem_body = b"".join(pem.splitlines()[1:-1]).decode()
    for text in (repr(key), str(key)):
        assert key.key_id in text  # the repr is still useful
        assert "PRIVATE KEY" not in text
        assert pem_body not in text
        assert pem_body[:16] not in text
        assert raw.hex() not in text
        assert base64.b64encode(raw).decode() not in text
        assert repr(raw) not in text


def test_verifying_key_base64_round_trip() -> None:
    public = SigningKey.generate("KOR").verifying_key()
    assert VerifyingKey.from_base64("KOR", public.key_id, public.to_base64()) == public


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        "not base64!",
        "",
    ],
)
def test_verifying_key_from_base64_rejects_bad_values(value: str) -> None:
    with pytest.raises(ValueError):
        VerifyingKey.from_base64("KOR", "KOR-ed25519-0000000000000000", value)


def test_verifying_key_from_base64_rejects_a_key_id_of_another_key() -> None:
    public = SigningKey.generate("KOR").verifying_key()
    other = SigningKey.generate("KOR").verifying_key()
    with pytest.raises(ValueError, match="does not match"):
        VerifyingKey.from_base64("KOR", other.key_id, public.to_base64())
    # Nor can a key be relabelled as another party's: the party is part of the id.
    with pytest.raises(ValueError, match="does not match"):
        VerifyingKey.from_base64("LAO", public.key_id, public.to_base64())


# private files


def test_write_private_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private_file(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == PRIVATE_FILE_MODE == 0o600
    assert (tmp_path / "k").read_bytes() == b"secret"


def test_write_private_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_private_file(path, b"new")
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o777, 0o610])
def test_check_private_file_refuses_group_or_other_access(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x")
    path.chmod(file_mode)
    with pytest.raises(PermissionError):
        check_private_file(path)


@pytest.mark.parametrize("file_mode", [0o600, 0o400, 0o700])
def test_check_private_file_accepts_owner_only(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x")
    path.chmod(file_mode)
    check_private_file(path)


def test_signing_key_load_round_trip(tmp_path: Path) -> None:
    key = SigningKey.generate("LAO")
    write_private_file(tmp_path / "signing.key", key.private_pem())
    loaded = SigningKey.load("LAO", tmp_path / "signing.key")
    assert loaded.key_id == key.key_id
    assert key.verifying_key().verify(loaded.sign(b"m"), b"m")


def test_signing_key_load_refuses_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(SigningKey.generate("LAO").private_pem())
    path.chmod(0o644)
    with pytest.raises(PermissionError):
        SigningKey.load("LAO", path)


def test_signing_key_load_refuses_a_non_ed25519_key(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(tmp_path / "signing.key", pem)
    with pytest.raises(ValueError, match="not an Ed25519"):
        SigningKey.load("LAO", tmp_path / "signing.key")


# init_party


def test_init_party_writes_private_keys_0600(parties: dict[str, PartyFiles]) -> None:
    files = parties["LAO"]
    for name in PRIVATE_FILES:
        assert mode(files.directory / name) == 0o600, name
    for path in (files.ca_certificate, files.node_certificate, files.card):
        assert path.is_file()
        assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_init_party_files_hold_what_they_say(parties: dict[str, PartyFiles]) -> None:
    files = parties["LAO"]
    for path in (files.ca_key, files.node_key):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
    signing = SigningKey.load("LAO", files.signing_key)
    assert isinstance(signing._private, Ed25519PrivateKey)
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    node = x509.load_pem_x509_certificate(files.node_certificate.read_bytes())
    node_key = serialization.load_pem_private_key(files.node_key.read_bytes(), password=None)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert node.public_key() == node_key.public_key()
    assert ca.public_key() == ca_key.public_key()
    node.verify_directly_issued_by(ca)


def test_init_party_certificates(parties: dict[str, PartyFiles]) -> None:
    files = parties["LAO"]
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    node = x509.load_pem_x509_certificate(files.node_certificate.read_bytes())

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}

    # Validity is computed from the ``now`` passed in, not from a clock.
    for cert, validity in ((ca, CA_VALIDITY), (node, NODE_VALIDITY)):
        assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
        assert cert.not_valid_after_utc == NOW + validity


def test_init_party_hosts(tmp_path: Path) -> None:
    files = init_party(tmp_path, "KOR", "KOR-NR", hosts=["kor.example", "10.0.0.7"], now=NOW)
    node = x509.load_pem_x509_certificate(files.node_certificate.read_bytes())
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["kor.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_init_party_refuses_to_overwrite(tmp_path: Path) -> None:
    init_party(tmp_path, "LAO", "LAO-NR", now=NOW)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError):
        init_party(tmp_path, "LAO", "LAO-NR", now=NOW)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("existing", [*PRIVATE_FILES, "card.toml"])
def test_init_party_refuses_if_any_key_file_exists(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        init_party(tmp_path, "LAO", "LAO-NR", now=NOW)
    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


@pytest.mark.parametrize("party", ["LA", "lao", "Lao", "LAOS", "", "L4O", " LAO", "LAO "])
def test_init_party_rejects_a_bad_party_code(tmp_path: Path, party: str) -> None:
    with pytest.raises(ValueError, match="alpha-3"):
        init_party(tmp_path / "p", party, "X-NR", now=NOW)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("party", ["LAO", "KOR", "JPN"])
def test_check_party_code_accepts_alpha_3(party: str) -> None:
    assert check_party_code(party) == party


def test_check_party_code_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError):
        check_party_code("LAO\n")


# partner cards


def test_card_round_trips(parties: dict[str, PartyFiles]) -> None:
    files = parties["LAO"]
    card = PartnerCard.load(files.card)
    signing = SigningKey.load("LAO", files.signing_key)
    assert card.party == "LAO"
    assert card.registry == "LAO-NR"
    assert card.ca_certificate_pem == files.ca_certificate.read_bytes()
    assert card.signing_keys == (signing.verifying_key(),)
    assert [k.key_id for k in card.signing_keys] == [signing.key_id]
    assert card.to_toml() == files.card.read_text()


def test_card_to_toml_then_load_is_identity(tmp_path: Path) -> None:
    key_a, key_b = SigningKey.generate("KOR"), SigningKey.generate("KOR")
    files = init_party(tmp_path / "kor", "KOR", "KOR-NR", now=NOW)
    card = PartnerCard(
        party="KOR",
        registry="KOR-NR",
        ca_certificate_pem=files.ca_certificate.read_bytes(),
        signing_keys=(key_a.verifying_key(), key_b.verifying_key()),
    )
    path = tmp_path / "card.toml"
    path.write_text(card.to_toml())
    assert PartnerCard.load(path) == card


def test_card_holds_no_private_material(parties: dict[str, PartyFiles]) -> None:
    files = parties["LAO"]
    text = files.card.read_text()
    assert "PRIVATE" not in text
    for name in PRIVATE_FILES:
        body = b"".join((files.directory / name).read_bytes().splitlines()[1:-1]).decode()
        assert body not in text


def test_card_with_a_tampered_public_key_is_rejected(
    parties: dict[str, PartyFiles], tmp_path: Path
) -> None:
    card = PartnerCard.load(parties["LAO"].card)
    [original] = card.signing_keys
    substitute = SigningKey.generate("LAO").verifying_key().to_base64()
    text = parties["LAO"].card.read_text()
    assert original.to_base64() in text
    path = tmp_path / "card.toml"
    path.write_text(text.replace(original.to_base64(), substitute))
    with pytest.raises(ValueError, match="does not match its public key"):
        PartnerCard.load(path)


def test_card_relabelled_to_another_party_is_rejected(
    parties: dict[str, PartyFiles], tmp_path: Path
) -> None:
    text = parties["LAO"].card.read_text().replace('party = "LAO"', 'party = "KOR"')
    path = tmp_path / "card.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="does not match its public key"):
        PartnerCard.load(path)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('party = "LAO"\n', ""),
        ('registry = "LAO-NR"\n', ""),
        ('party = "LAO"', 'party = "lao"'),
        ("-----BEGIN CERTIFICATE-----", "-----BEGIN CERTIFICATE-----\nAAAA"),
        ("[[signing_keys]]", "[[other_keys]]"),
        ("key_id", "kid"),
        ('public_key = "', 'public_key = "!'),
        ('party = "LAO"', 'party = "LAO'),  # no longer TOML
    ],
)
def test_malformed_card_is_rejected(
    parties: dict[str, PartyFiles], tmp_path: Path, old: str, new: str
) -> None:
    text = parties["LAO"].card.read_text()
    assert old in text
    path = tmp_path / "card.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match="partner card"):
        PartnerCard.load(path)


def test_missing_card_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="partner card"):
        PartnerCard.load(tmp_path / "absent.toml")


# issuing_party


def test_issuing_party_maps_a_node_certificate_to_its_party(
    parties: dict[str, PartyFiles],
) -> None:
    cards = [PartnerCard.load(parties[p].card) for p in ("LAO", "KOR")]
    assert issuing_party(parties["LAO"].node_certificate.read_bytes(), cards) == "LAO"
    assert issuing_party(parties["KOR"].node_certificate.read_bytes(), cards) == "KOR"
    assert issuing_party(parties["LAO"].node_certificate.read_bytes(), cards[::-1]) == "LAO"


def test_issuing_party_of_a_third_party_is_none(parties: dict[str, PartyFiles]) -> None:
    cards = [PartnerCard.load(parties[p].card) for p in ("LAO", "KOR")]
    assert issuing_party(parties["JPN"].node_certificate.read_bytes(), cards) is None


def test_issuing_party_checks_the_signature_not_the_name(parties: dict[str, PartyFiles]) -> None:
    # The impostor's CA has the same subject name as LAO's, but a different key.
    impostor = parties["LAO-impostor"].node_certificate.read_bytes()
    cards = [PartnerCard.load(parties[p].card) for p in ("LAO", "KOR")]
    assert issuing_party(impostor, cards) is None


def test_issuing_party_of_garbage_is_none(parties: dict[str, PartyFiles]) -> None:
    cards = [PartnerCard.load(parties["LAO"].card)]
    assert issuing_party(b"not a certificate", cards) is None
    assert issuing_party(parties["LAO"].node_certificate.read_bytes(), []) is None


@pytest.mark.parametrize("signing_keys", ['signing_keys = "abc"', "signing_keys = [1]"])
def test_card_with_signing_keys_that_are_not_tables_is_rejected(
    parties: dict[str, PartyFiles], tmp_path: Path, signing_keys: str
) -> None:
    text = parties["LAO"].card.read_text()
    path = tmp_path / "card.toml"
    path.write_text(text.split("[[signing_keys]]")[0] + signing_keys + "\n")
    with pytest.raises(ValueError, match="partner card"):
        PartnerCard.load(path)


@pytest.mark.parametrize("registry", ['LAO "NR"', "", "LAO NR", "-LAO"])
def test_init_party_refuses_a_registry_id_a_card_could_not_carry(
    tmp_path: Path, registry: str
) -> None:
    with pytest.raises(ValueError, match="registry"):
        init_party(tmp_path / "p", "LAO", registry, now=dt.datetime.now(dt.UTC))


def test_trust_store_refuses_a_key_id_re_pinned_for_another_party() -> None:
    from itmolink.crypto.envelope import TrustStore
    from itmolink.crypto.keys import VerifyingKey

    key = SigningKey.generate("LAO").verifying_key()
    store = TrustStore([key])
    with pytest.raises(ValueError, match="pinned twice"):
        store.add(VerifyingKey("KOR", key.key_id, key.public_bytes))
    assert store.parties() == {"LAO"}


def test_init_party_creates_an_admin_operator_with_a_private_random_token(tmp_path: Path) -> None:
    from itmolink.crypto.operators import load_operators, operator_for, read_token, token_file

    init_party(tmp_path / "a", "LAO", "LAO-NR", now=NOW)
    init_party(tmp_path / "b", "LAO", "LAO-NR", now=NOW)
    first = token_file(tmp_path / "a", "admin")
    assert first.stat().st_mode & 0o777 == 0o600
    token = read_token(first)
    assert token != read_token(token_file(tmp_path / "b", "admin"))  # no default secret
    assert len(token) >= 40
    operators = load_operators(tmp_path / "a")
    assert operator_for(token, operators) == "admin"
    assert operator_for(token + "x", operators) is None
    assert token not in (tmp_path / "a" / "operators.toml").read_text()


# node certificate renewal (itmolink pki renew)


def _copy_party(source: PartyFiles, to: Path) -> PartyFiles:
    to.mkdir()
    for path in source.directory.iterdir():
        if path.is_file():
            (to / path.name).write_bytes(path.read_bytes())
            (to / path.name).chmod(mode(path))
    return PartyFiles(to)


def _renew(files: PartyFiles, **overrides: object) -> x509.Certificate:
    arguments: dict[str, object] = dict(
        ca_certificate=files.ca_certificate, ca_key=files.ca_key,
        node_certificate=files.node_certificate, node_key=files.node_key, hosts=None,
        now=NOW + dt.timedelta(days=800),
    )  # fmt: skip
    arguments.update(overrides)
    return renew_node_certificate(**arguments)  # type: ignore[arg-type]


def test_renewal_makes_a_new_key_and_certificate_from_the_same_ca(
    parties: dict[str, PartyFiles], tmp_path: Path
) -> None:
    files = _copy_party(parties["LAO"], tmp_path / "lao")
    old_cert = x509.load_pem_x509_certificate(files.node_certificate.read_bytes())
    old_key = files.node_key.read_bytes()
    new = _renew(files)

    assert x509.load_pem_x509_certificate(files.node_certificate.read_bytes()) == new
    assert new.serial_number != old_cert.serial_number
    assert new.subject == old_cert.subject
    assert (
        certificate_hosts(new) == certificate_hosts(old_cert) == ["localhost", "127.0.0.1", "::1"]
    )
    assert new.not_valid_after_utc == NOW + dt.timedelta(days=800) + NODE_VALIDITY
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    new.verify_directly_issued_by(ca)
    assert files.node_key.read_bytes() != old_key  # a new key, and the certificate is for it
    assert check_node_certificate(
        files.node_key.read_bytes(), files.node_certificate.read_bytes(),
        ca_pem=files.ca_certificate.read_bytes(), now=NOW + dt.timedelta(days=800),
    ) == new  # fmt: skip
    assert mode(files.node_key) == PRIVATE_FILE_MODE
    assert mode(files.node_certificate) == 0o644
    assert sorted(p.name for p in files.directory.iterdir() if p.name.startswith(".")) == []
    # The old pair is kept beside the new one.
    assert (files.directory / "node.key.previous").read_bytes() == old_key
    assert (
        x509.load_pem_x509_certificate((files.directory / "node.pem.previous").read_bytes())
        == old_cert
    )
    # The partner card does not change: partners pin the CA, which is the same.
    assert issuing_party(files.node_certificate.read_bytes(), [PartnerCard.load(files.card)]) == (
        "LAO"
    )


def test_renewal_takes_new_host_names(parties: dict[str, PartyFiles], tmp_path: Path) -> None:
    files = _copy_party(parties["KOR"], tmp_path / "kor")
    new = _renew(files, hosts=["registry.kor.example", "10.0.0.7"])
    assert certificate_hosts(new) == ["registry.kor.example", "10.0.0.7"]


@pytest.mark.parametrize("wrong", ["ca_key", "node_certificate"])
def test_renewal_refuses_material_of_another_ca_and_changes_nothing(
    parties: dict[str, PartyFiles], tmp_path: Path, wrong: str
) -> None:
    files = _copy_party(parties["LAO"], tmp_path / "lao")
    impostor = parties["LAO-impostor"]
    if wrong == "node_certificate":  # a node certificate the CA did not issue
        files.node_certificate.write_bytes(impostor.node_certificate.read_bytes())
    before = {p.name: p.read_bytes() for p in files.directory.iterdir() if p.is_file()}
    overrides = {"ca_key": impostor.ca_key} if wrong == "ca_key" else {}
    with pytest.raises(ValueError, match=r"not the key of the CA|not issued by the CA"):
        _renew(files, **overrides)
    assert {p.name: p.read_bytes() for p in files.directory.iterdir() if p.is_file()} == before


def test_check_node_certificate_refuses_what_would_not_work(
    parties: dict[str, PartyFiles],
) -> None:
    lao, kor, impostor = parties["LAO"], parties["KOR"], parties["LAO-impostor"]
    key, cert = lao.node_key.read_bytes(), lao.node_certificate.read_bytes()
    ca = lao.ca_certificate.read_bytes()
    assert check_node_certificate(key, cert, ca_pem=ca, now=NOW)  # the good pair
    with pytest.raises(ValueError, match="not for the node key"):
        check_node_certificate(key, kor.node_certificate.read_bytes())
    with pytest.raises(ValueError, match="no PEM certificate"):
        check_node_certificate(key, b"not a certificate")
    with pytest.raises(ValueError, match="not issued by this party's CA"):
        check_node_certificate(
            impostor.node_key.read_bytes(), impostor.node_certificate.read_bytes(), ca_pem=ca
        )
    with pytest.raises(ValueError, match="not now"):
        check_node_certificate(key, cert, now=NOW + NODE_VALIDITY + dt.timedelta(days=1))


def test_renewal_refuses_an_expired_ca_and_ends_with_the_ca(
    parties: dict[str, PartyFiles], tmp_path: Path
) -> None:
    files = _copy_party(parties["LAO"], tmp_path / "lao")
    with pytest.raises(ValueError, match="a new CA needs a new partner card"):
        _renew(files, now=NOW + CA_VALIDITY + dt.timedelta(days=1))
    near_end = NOW + CA_VALIDITY - dt.timedelta(days=100)
    new = _renew(files, now=near_end)  # the CA is valid for 100 days more
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    assert new.not_valid_after_utc == ca.not_valid_after_utc


def test_a_renewal_that_cannot_write_the_certificate_changes_nothing(
    parties: dict[str, PartyFiles], tmp_path: Path
) -> None:
    files = _copy_party(parties["LAO"], tmp_path / "lao")
    before = {p.name: p.read_bytes() for p in files.directory.iterdir() if p.is_file()}
    # The certificate's staging file cannot be made (a directory is in its way).
    (files.directory / ".node.pem.new").mkdir()
    with pytest.raises(OSError):
        _renew(files)
    (files.directory / ".node.pem.new").rmdir()
    after = {p.name: p.read_bytes() for p in files.directory.iterdir() if p.is_file()}
    assert after == before  # the key was not replaced, and no staging file is left


def test_renewal_replaces_the_key_file_it_is_told(
    parties: dict[str, PartyFiles], tmp_path: Path
) -> None:
    files = _copy_party(parties["LAO"], tmp_path / "lao")
    secret = tmp_path / "secrets" / "node.key"  # as a Docker secret's file on the host
    secret.parent.mkdir()
    files.node_key.rename(secret)
    with pytest.raises(ValueError, match="--node-key"):
        _renew(files)  # no node.key where it looked: nothing is created there
    assert not files.node_key.exists()
    new = _renew(files, node_key=secret)
    assert check_node_certificate(secret.read_bytes(), files.node_certificate.read_bytes()) == new
    assert mode(secret) == PRIVATE_FILE_MODE
    assert not files.node_key.exists()
