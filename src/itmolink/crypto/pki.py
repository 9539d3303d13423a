"""Party key material: a CA, a node certificate for mutual TLS, a signing key.

``init_party`` lays out one party's directory::

    ca.pem ca.key           the party's own certificate authority (ECDSA P-256)
    node.pem node.key       the node certificate, for both TLS server and client
    signing.key             the Ed25519 key that signs protocol messages
    card.toml               the public partner card to hand to partner registries
    operators.toml          digests of the admin operators' tokens
    operators/admin.token   the first operator's token (crypto/operators.py)

Private keys are created with mode 0600 and never printed. A partner pins the
party's CA certificate (for mutual TLS) and its signing public keys (for
envelopes) from the card.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from itmolink.crypto.keys import SigningKey, VerifyingKey, is_key_id_of, write_private_file
from itmolink.crypto.operators import add_operator

PARTY_CODE = re.compile(r"[A-Z]{3}")
REGISTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CA_VALIDITY = dt.timedelta(days=3650)
NODE_VALIDITY = dt.timedelta(days=825)
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_party_code(party: str) -> str:
    if not PARTY_CODE.fullmatch(party):
        raise ValueError(
            f"party {party!r} is not an ISO 3166-1 alpha-3 code such as LAO, KOR or JPN"
        )
    return party


def check_registry_id(registry: str) -> str:
    if not REGISTRY_ID.fullmatch(registry):
        raise ValueError(
            f"registry {registry!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "starting with a letter or digit, e.g. LAO-NR"
        )
    return registry


@dataclass(frozen=True, slots=True)
class PartyFiles:
    """Paths of one party's key material (private keys may live elsewhere)."""

    directory: Path
    node_key_file: Path | None = None
    signing_key_file: Path | None = None

    @property
    def ca_certificate(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def node_certificate(self) -> Path:
        return self.directory / "node.pem"

    @property
    def node_key(self) -> Path:
        return self.node_key_file or self.directory / "node.key"

    @property
    def signing_key(self) -> Path:
        return self.signing_key_file or self.directory / "signing.key"

    @property
    def card(self) -> Path:
        return self.directory / "card.toml"


@dataclass(frozen=True, slots=True)
class RevokedKey:
    """A signing key the card's party revoked: it signs nothing, whatever an older
    copy of the card says. With ``compromised_since``, the keys announced with it
    (in-band) from that instant on fall with it (PROTOCOL §2.4, §3.8)."""

    key_id: str
    revoked_at: dt.datetime
    compromised_since: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class PartnerCard:
    """What a party publishes to its partners: identity, CA, signing keys, and the
    signing keys it revoked."""

    party: str
    registry: str
    ca_certificate_pem: bytes
    signing_keys: tuple[VerifyingKey, ...]
    revoked_keys: tuple[RevokedKey, ...] = ()

    def revoking(
        self, key_id: str, at: dt.datetime, compromised_since: dt.datetime | None = None
    ) -> PartnerCard:
        """This card without the key ``key_id`` among its signing keys, and with it
        among its revoked keys (once; the earliest compromise instant stands)."""
        kept = tuple(k for k in self.signing_keys if k.key_id != key_id)
        known = next((r for r in self.revoked_keys if r.key_id == key_id), None)
        others = tuple(r for r in self.revoked_keys if r.key_id != key_id)
        if known is not None:
            earliest = min(
                (m for m in (known.compromised_since, compromised_since) if m is not None),
                default=None,
            )
            entry = RevokedKey(key_id, known.revoked_at, earliest)
        else:
            entry = RevokedKey(key_id, at, compromised_since)
        return PartnerCard(
            self.party, self.registry, self.ca_certificate_pem, kept, (*others, entry)
        )

    def listing(self, revocations: Sequence[RevokedKey]) -> PartnerCard:
        """This card with every revocation of ``revocations`` it lacks (or lists
        with a later compromise instant) among its revoked keys: a ledger's own
        revocations made before cards listed them (PROTOCOL §3.8)."""
        card = self
        listed = {r.key_id: r for r in self.revoked_keys}
        for revocation in revocations:
            known = listed.get(revocation.key_id)
            since = revocation.compromised_since
            if known is not None and (
                since is None
                or (known.compromised_since is not None and known.compromised_since <= since)
            ):
                continue
            card = card.revoking(revocation.key_id, revocation.revoked_at, since)
        return card

    def to_toml(self) -> str:
        lines = [
            "# itmolink partner card: public material only. Give it to partner registries,",
            "# which pin this CA for mutual TLS and these keys for signed messages.",
            f'party = "{self.party}"',
            f'registry = "{self.registry}"',
            f'ca_certificate = """\n{self.ca_certificate_pem.decode("ascii").strip()}\n"""',
        ]
        for key in self.signing_keys:
            lines += [
                "",
                "[[signing_keys]]",
                f'key_id = "{key.key_id}"',
                f'public_key = "{key.to_base64()}"',
            ]
            for name in ("not_before", "not_after"):
                moment = getattr(key, name)
                if moment is not None:
                    lines.append(f"{name} = {moment.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}")
        for revoked in self.revoked_keys:
            lines += [
                "",
                "[[revoked_keys]]",
                f'key_id = "{revoked.key_id}"',
                f"revoked_at = {_toml_time(revoked.revoked_at)}",
            ]
            if revoked.compromised_since is not None:
                lines.append(f"compromised_since = {_toml_time(revoked.compromised_since)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> PartnerCard:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"partner card {path}: {exc}") from None
        try:
            party = check_party_code(str(data["party"]))
            registry = check_registry_id(str(data["registry"]))
            ca_pem = str(data["ca_certificate"]).strip().encode("ascii") + b"\n"
            x509.load_pem_x509_certificate(ca_pem)
            entries = data.get("signing_keys", [])
            if not isinstance(entries, list) or not all(isinstance(k, dict) for k in entries):
                raise ValueError("signing_keys must be a list of [[signing_keys]] tables")
            keys = tuple(_card_key(party, k) for k in entries)
            listed = data.get("revoked_keys", [])
            if not isinstance(listed, list) or not all(isinstance(k, dict) for k in listed):
                raise ValueError("revoked_keys must be a list of [[revoked_keys]] tables")
            revoked = tuple(_revoked_key(party, k) for k in listed)
        except KeyError as exc:
            raise ValueError(f"partner card {path}: missing field {exc.args[0]!r}") from None
        except ValueError as exc:
            raise ValueError(f"partner card {path}: {exc}") from None
        if not keys:
            raise ValueError(f"partner card {path}: no [[signing_keys]] entry")
        return cls(
            party=party, registry=registry, ca_certificate_pem=ca_pem, signing_keys=keys,
            revoked_keys=revoked,
        )  # fmt: skip


def _toml_time(moment: dt.datetime) -> str:
    return f"{moment.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


def _revoked_key(party: str, entry: dict[str, object]) -> RevokedKey:
    key_id = str(entry["key_id"])
    if not is_key_id_of(party, key_id):
        raise ValueError(
            f"revoked key {key_id!r} is not a key id of {party} ('{party}-ed25519-' and "
            "16 lowercase hex digits)"
        )
    moments: dict[str, dt.datetime | None] = {}
    for name in ("revoked_at", "compromised_since"):
        value = entry.get(name)
        if value is None and name == "compromised_since":
            moments[name] = None
            continue
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError(
                f"revoked key {key_id}: {name} must be a TOML date-time with an offset, "
                "e.g. 2027-01-01T00:00:00Z"
            )
        moments[name] = value
    revoked_at = moments["revoked_at"]
    assert revoked_at is not None
    return RevokedKey(key_id, revoked_at, moments["compromised_since"])


def _card_key(party: str, entry: dict[str, object]) -> VerifyingKey:
    key = VerifyingKey.from_base64(party, str(entry["key_id"]), str(entry["public_key"]))
    bounds = {}
    for name in ("not_before", "not_after"):
        value = entry.get(name)
        if value is None:
            continue
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError(
                f"signing key {key.key_id}: {name} must be a TOML date-time with an offset, "
                "e.g. 2027-01-01T00:00:00Z"
            )
        bounds[name] = value
    return VerifyingKey.from_raw(party, key.key_id, key.public_bytes, **bounds)


def _name(party: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"itmolink {party}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{party} {role}"),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def init_party(
    directory: Path,
    party: str,
    registry: str,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    now: dt.datetime,
) -> PartyFiles:
    """Create a party's CA, node certificate, signing key and partner card.

    Refuses to overwrite existing key material: rotating keys is a deliberate
    operation, not a side effect of re-running init.
    """
    check_party_code(party)
    check_registry_id(registry)
    files = PartyFiles(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = [
        p for p in (files.ca_key, files.node_key, files.signing_key, files.card) if p.exists()
    ]
    if existing:
        raise FileExistsError(
            f"{existing[0]} already exists; refusing to overwrite key material "
            f"(move the directory away to start again)"
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(party, "registry CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    node_key = ec.generate_private_key(ec.SECP256R1())
    node_cert = _node_certificate(
        ca_key, ca_cert, _name(party, "registry node"), node_key, hosts, now, now + NODE_VALIDITY
    )

    signing = SigningKey.generate(party)

    write_private_file(files.ca_key, _pem_key(ca_key))
    write_private_file(files.node_key, _pem_key(node_key))
    write_private_file(files.signing_key, signing.private_pem())
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    files.ca_certificate.write_bytes(ca_pem)
    files.node_certificate.write_bytes(node_cert.public_bytes(serialization.Encoding.PEM))
    card = PartnerCard(
        party=party,
        registry=registry,
        ca_certificate_pem=ca_pem,
        signing_keys=(signing.verifying_key(),),
    )
    files.card.write_text(card.to_toml())
    add_operator(directory, "admin")
    return files


def _node_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    node_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _public_der(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an ECDSA key")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ec_private_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} is no unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{what} is not an ECDSA key")
    return key


def check_node_certificate(
    key_pem: bytes,
    certificate_pem: bytes,
    *,
    ca_pem: bytes | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The node certificate, once checked: a PEM certificate for ``key_pem``; when
    ``ca_pem`` is given, issued by that CA (the one partners pin); when ``now`` is
    given, valid at that instant. Raises ValueError naming what is wrong."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as exc:
        raise ValueError(f"the node certificate is no PEM certificate ({exc})") from None
    key = _ec_private_key(key_pem, "the node key")
    if _public_der(certificate.public_key()) != _public_der(key.public_key()):
        raise ValueError("the node certificate is not for the node key")
    if ca_pem is not None:
        try:
            certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(
                "the node certificate is not issued by this party's CA: partners would refuse "
                "the TLS handshake"
            ) from None
    if now is not None and not (
        certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc
    ):
        raise ValueError(
            f"the node certificate is valid from {certificate.not_valid_before_utc:%Y-%m-%d} "
            f"to {certificate.not_valid_after_utc:%Y-%m-%d}, not now"
        )
    return certificate


def certificate_hosts(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate names, in its order."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san if isinstance(name, (x509.DNSName, x509.IPAddress))]


def renew_node_certificate(
    *,
    ca_certificate: Path,
    ca_key: Path,
    node_certificate: Path,
    node_key: Path,
    hosts: Sequence[str] | None,
    now: dt.datetime,
) -> x509.Certificate:
    """Replace the node's TLS key and certificate with new ones from the party's CA.

    A new key is made (renewal is also key rotation). The new certificate keeps
    the current one's subject and, unless ``hosts`` is given, its host names; it
    is valid for NODE_VALIDITY from ``now``, but never beyond the CA's own end.
    Partners pin the CA, not the node certificate, so they need nothing new.
    Refuses unless the CA key is the CA certificate's, the CA is valid now, and
    the current node certificate was issued by that CA (a node certificate from
    another CA would not be accepted by the partners).

    Both new files are written and flushed beside the old ones first, with the
    old ones' owner and mode, then renamed over them one after the other, the
    key first; the old pair is kept as ``<name>.previous``. A node reading the
    files between the two renames sees a key and a certificate that do not
    match, and keeps what it has until both are new
    (:class:`itmolink.node.tls.NodeTls`).
    """
    ca_cert = x509.load_pem_x509_certificate(ca_certificate.read_bytes())
    signer = _ec_private_key(ca_key.read_bytes(), str(ca_key))
    if _public_der(ca_cert.public_key()) != _public_der(signer.public_key()):
        raise ValueError(f"{ca_key} is not the key of the CA certificate {ca_certificate}")
    if not ca_cert.not_valid_before_utc <= now < ca_cert.not_valid_after_utc:
        raise ValueError(
            f"the CA in {ca_certificate} is valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}, "
            "not now: a new CA needs a new partner card at every partner"
        )
    if not node_key.is_file():
        raise ValueError(
            f"{node_key}: no such file; name the node's TLS key with --node-key (or --config) "
            "so that the key the node reads is the one replaced"
        )
    current = x509.load_pem_x509_certificate(node_certificate.read_bytes())
    try:
        current.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(
            f"{node_certificate} was not issued by the CA in {ca_certificate}: "
            "partners pin that CA, so a node certificate must come from it"
        ) from None
    names = list(hosts) if hosts else certificate_hosts(current)
    if not names:
        raise ValueError(f"{node_certificate} names no host: give the node's hosts with --host")
    new_key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + NODE_VALIDITY, ca_cert.not_valid_after_utc)
    new_cert = _node_certificate(signer, ca_cert, current.subject, new_key, names, now, not_after)
    key_file = _staged(node_key, _pem_key(new_key))
    try:
        cert_file = _staged(node_certificate, new_cert.public_bytes(serialization.Encoding.PEM))
    except BaseException:
        key_file.unlink(missing_ok=True)
        raise
    try:
        for path in (node_key, node_certificate):
            previous = path.with_name(f"{path.name}.previous")
            previous.unlink(missing_ok=True)
            os.link(path, previous)  # the old file stays, under another name
        os.replace(key_file, node_key)
        os.replace(cert_file, node_certificate)
    finally:
        key_file.unlink(missing_ok=True)
        cert_file.unlink(missing_ok=True)
    for directory in {node_key.parent, node_certificate.parent}:
        _fsync_directory(directory)
    return new_cert


def _staged(path: Path, data: bytes) -> Path:
    """``data`` written and flushed to a new file beside ``path``, with ``path``'s
    mode, owner and group (so that a renewal run as root leaves the node's key
    readable by the node's user)."""
    staged = path.with_name(f".{path.name}.new")
    staged.unlink(missing_ok=True)
    old = path.stat()
    try:
        write_private_file(staged, data)  # 0600 from the start
        if os.geteuid() == 0:
            os.chown(staged, old.st_uid, old.st_gid)
        staged.chmod(old.st_mode & 0o777)
        with staged.open("rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def issuing_party(peer_certificate_pem: bytes, cards: Sequence[PartnerCard]) -> str | None:
    """The party whose pinned CA directly issued ``peer_certificate_pem``, if any.

    The TLS handshake has already checked the chain against the pinned CAs;
    this maps the authenticated certificate to the partner it belongs to.
    """
    try:
        peer = x509.load_pem_x509_certificate(peer_certificate_pem)
    except ValueError:
        return None
    for card in cards:
        ca = x509.load_pem_x509_certificate(card.ca_certificate_pem)
        try:
            peer.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return card.party
    return None
