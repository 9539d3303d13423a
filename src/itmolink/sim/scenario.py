"""Scenario files for ``itmolink simulate``: parties, activities and a 2021-2030 schedule.

A scenario is a TOML file; every table below is required unless marked optional.
Quantities are whole tCO2e, shares are basis points (8000 = 80%)::

    [scenario]
    name = "Lao PDR - Korea, Article 6.2"
    description = "..."                   # optional
    first_year = 2021                     # optional; the simulated years (default 2021-2030)
    last_year = 2030

    [[parties]]
    code = "LAO"                          # ISO 3166-1 alpha-3
    name = "Lao PDR"                      # optional, default the code
    registry = "LAO-NR"                   # optional, default "<code>-NR"
    [parties.ndc]
    method = "averaging"                  # or "multi-year-trajectory", "multi-year-budget"
    first_year = 2021                     # optional: the NDC period (default: the scenario's)
    last_year = 2030
    target_year = 2030                    # averaging: the single target year
    target_emissions = 62000000           # averaging: target-year tCO2e; budget: period total
    trajectory = [70000000, 62000000]     # multi-year-trajectory: see "year series" below
    baseline_year = 2000                  # optional, reported only
    baseline_emissions = 155000000
    reported_emissions = [63000000, 61500000]   # year series: what the party reports
    [parties.threshold]                   # optional: host threshold on first transfers
    per_year = 500000
    per_period = 3000000

    [[activities]]
    id = "LAO-SOLAR-WIND-1GW"             # the activity id carried by the units
    name = "1 GW solar and wind"          # optional
    host = "LAO"                          # a party of this scenario
    mitigation_per_year = 100000          # tCO2e a year, Table 11.1
    first_year = 2021                     # optional: years the activity mitigates (default
    last_year = 2030                      # the scenario's)

    [[authorisations]]
    id = "solar-kor"                      # scenario-local name, used by the schedule
    activity = "LAO-SOLAR-WIND-1GW"
    cooperative_approach = "LAO-KOR-A6.2"
    acquiring = ["KOR"]                   # acquiring parties (each must be a party)
    purposes = ["NDC"]                    # optional: ["NDC"] (the default), ["OIMP"] or
                                          # ["NDC", "OIMP"] (both, in either order)
    oimp_detail = "CORSIA"                # with OIMP: which purpose (default "CORSIA")
    first_transfer = "use"                # with OIMP: "authorisation", "issuance" or "use".
                                          # OIMP only: the host books its adjustment at
                                          # issuance (the first two) or when the units are
                                          # used for OIMP. With NDC too: at the host's
                                          # first international transfer, whatever this says
                                          # (so both sides book that transfer), and at the
                                          # host's own use for OIMP of units it kept; an
                                          # acquiring party gives back at its use for OIMP
    vintage_from = 2021                   # optional, default the activity's years
    vintage_to = 2030
    quantity_cap = 0                      # optional, 0 = no cap
    buyer_share_bp = 0                    # optional: JCM-style share of every issuance that
                                          # goes to the (single) acquiring party at issuance
                                          # (for OIMP-only units without an adjustment: the
                                          # host's is booked at issuance or at their use)

    [[issuances]]                         # the host issues under an authorisation...
    authorisation = "solar-kor"
    years = [2021, 2030]                  # ...every year of this range (or: year = 2025)
    quantity = 100000                     # optional, default the activity's mitigation_per_year
    vintage_offset = 0                    # optional: vintage = year + offset (<= 0)

    [[transfers]]                         # the host first-transfers to an acquiring party...
    authorisation = "solar-kor"
    to = "KOR"
    years = [2022, 2030]                  # ...every year of this range (or: year = 2025)
    quantity = 60000
    vintage_offset = -1                   # optional: vintage = year + offset (<= 0)
    from = "LAO"                          # optional, default the host; another acquiring
                                          # party passes on units it acquired (an onward
                                          # transfer, to an acquiring party of the same
                                          # authorisation)

    [[uses]]                              # optional: an acquiring party uses units it
    party = "KOR"                         # acquired toward its NDC (they are retired)...
    authorisation = "solar-kor"
    years = [2023, 2030]                  # ...every year of this range (or: year = 2025),
    quantity = 50000                      # each toward the NDC of that year
    vintage_offset = -1                   # optional: vintage = year + offset (<= 0)
    action = "use-ndc"                    # optional: or "voluntary-cancellation", by the
                                          # host or an acquiring party (units cancelled,
                                          # toward no NDC); for OIMP units "use-oimp" (by
                                          # the host or an acquiring party; the default
                                          # for them) or "voluntary-cancellation"; units
                                          # authorised for both: "use-ndc" (the default) by
                                          # an acquiring party, "use-oimp" by the host or an
                                          # acquiring party (docs/DESIGN.md decisions 58,
                                          # 59), or cancellation

A *year series* is either a table ``{ 2021 = 63000000, 2022 = ... }`` with one entry for
every year of the NDC period, or a pair ``[first, last]`` interpolated linearly (rounded
down) over the NDC period.

The schedule is checked before anything runs: vintages inside the authorisation and the
activity's years, issuance per vintage never above the activity's mitigation, no
transfer of a vintage before enough of it is held, and no use of more than the party has
acquired of that vintage by then. Within a simulated year the runner plays the
issuances, then the first transfers, then the onward transfers, then the uses (each
group in a seeded random order), so units may move on in the year they arrive, but
not twice in one year. A bad file raises :class:`ScenarioError`
whose message names the file and the field, e.g.
``examples/x.toml: parties[1].ndc.method: must be one of averaging, ...``.
"""

from __future__ import annotations

import tomllib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itmolink.core.accounting import AccountingMethod
from itmolink.core.issuance import IssuancePolicy, split_issuance
from itmolink.core.units import UnitType
from itmolink.crypto.pki import check_party_code, check_registry_id

FIRST_VINTAGE = 2021  # ITMOs come from activities from 2021 on
METHODS = tuple(sorted(m.value for m in AccountingMethod))


class ScenarioError(ValueError):
    """A scenario file that cannot be simulated; the message names the file and field."""


@dataclass(frozen=True, slots=True)
class Ndc:
    method: str
    first_year: int
    last_year: int
    target_emissions: int
    target_year: int | None
    trajectory: Mapping[int, int]
    reported_emissions: Mapping[int, int]
    baseline_year: int | None = None
    baseline_emissions: int | None = None

    @property
    def years(self) -> range:
        return range(self.first_year, self.last_year + 1)


@dataclass(frozen=True, slots=True)
class Threshold:
    per_year: int | None = None
    per_period: int | None = None


@dataclass(frozen=True, slots=True)
class Party:
    code: str
    name: str
    registry: str
    ndc: Ndc
    threshold: Threshold | None = None


@dataclass(frozen=True, slots=True)
class Activity:
    id: str
    name: str
    host: str
    mitigation_per_year: int
    first_year: int
    last_year: int

    @property
    def years(self) -> range:
        return range(self.first_year, self.last_year + 1)


FIRST_TRANSFER_POINTS = ("authorisation", "issuance", "use")


@dataclass(frozen=True, slots=True)
class AuthorisationSpec:
    id: str
    activity: str
    host: str
    cooperative_approach: str
    acquiring: tuple[str, ...]
    purposes: tuple[str, ...]
    vintage_from: int
    vintage_to: int
    quantity_cap: int = 0
    buyer_share_bp: int = 0
    # With OIMP: the purpose, and when the units are first transferred for OIMP (one
    # of FIRST_TRANSFER_POINTS); empty for NDC-only units, first transferred at the
    # transfer.
    oimp_detail: str = ""
    first_transfer: str = ""

    @property
    def ndc(self) -> bool:
        """Whether the units may be used toward an NDC (alone or with OIMP)."""
        return "NDC" in self.purposes

    @property
    def for_oimp(self) -> bool:
        """Whether the units may be used for OIMP (alone or with NDC)."""
        return "OIMP" in self.purposes

    @property
    def oimp_only(self) -> bool:
        return self.purposes == ("OIMP",)

    @property
    def both(self) -> bool:
        return self.ndc and self.for_oimp

    @property
    def ca_point(self) -> str:
        """When the host books its adjustment: "transfer" (NDC, alone or with OIMP),
        "issuance" or "use" (OIMP only, by its first-transfer definition)."""
        if self.ndc:
            return "transfer"
        return "use" if self.first_transfer == "use" else "issuance"

    @property
    def host_books_own_oimp_use(self) -> bool:
        """Whether the host books its adjustment when it uses its own units for OIMP:
        their first transfer is that use ("use"), or, for units authorised for an NDC
        too, never adjusted while the host kept them, whatever the OIMP definition
        (docs/DESIGN.md decision 59)."""
        return self.both or (self.for_oimp and self.first_transfer == "use")


@dataclass(frozen=True, slots=True)
class Issuance:
    """One issuance of ``quantity`` of ``vintage`` in simulated ``year``."""

    year: int
    authorisation: str
    vintage: int
    quantity: int


@dataclass(frozen=True, slots=True)
class Transfer:
    """One first transfer of ``quantity`` of ``vintage`` in simulated ``year``."""

    year: int
    authorisation: str
    from_party: str
    to_party: str
    vintage: int
    quantity: int


USE_ACTIONS = ("use-ndc", "use-oimp", "voluntary-cancellation")


@dataclass(frozen=True, slots=True)
class Use:
    """``party`` uses ``quantity`` of ``vintage`` toward its NDC of simulated ``year``
    (``action`` "use-ndc"), for OIMP ("use-oimp"), or cancels it voluntarily
    ("voluntary-cancellation")."""

    year: int
    authorisation: str
    party: str
    vintage: int
    quantity: int
    action: str = "use-ndc"


@dataclass(frozen=True, slots=True)
class Scenario:
    path: str
    name: str
    description: str
    first_year: int
    last_year: int
    parties: tuple[Party, ...]
    activities: tuple[Activity, ...]
    authorisations: tuple[AuthorisationSpec, ...]
    issuances: tuple[Issuance, ...]  # expanded, one per year, in file order within a year
    transfers: tuple[Transfer, ...]
    uses: tuple[Use, ...] = ()

    @property
    def years(self) -> range:
        return range(self.first_year, self.last_year + 1)

    def party(self, code: str) -> Party:
        return next(p for p in self.parties if p.code == code)

    def activity(self, activity_id: str) -> Activity:
        return next(a for a in self.activities if a.id == activity_id)

    def authorisation(self, key: str) -> AuthorisationSpec:
        return next(a for a in self.authorisations if a.id == key)

    def links(self) -> list[tuple[str, str]]:
        """The pairs that need a partner link, sorted: (host, acquirer) of each
        authorisation, and (sender, receiver) of each onward transfer."""
        pairs = {(a.host, b) for a in self.authorisations for b in a.acquiring}
        pairs |= {(t.from_party, t.to_party) for t in self.transfers if self.onward(t)}
        return sorted(pairs)

    def onward(self, transfer: Transfer) -> bool:
        """Whether ``transfer`` passes on units first transferred by their host."""
        return transfer.from_party != self.authorisation(transfer.authorisation).host

    def buyer_share(self, issuance: Issuance) -> int:
        """How much of an issuance goes to the acquiring party at issuance (JCM share)."""
        spec = self.authorisation(issuance.authorisation)
        if not spec.buyer_share_bp:
            return 0
        policy = IssuancePolicy(spec.buyer_share_bp, 0)
        return split_issuance(UnitType.ITMO, issuance.quantity, policy).buyer_share


# -- parsing -------------------------------------------------------------------------------


class _Reader:
    """Typed field access that names the offending field in its errors."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.path}: {where}: {message}")

    def table(
        self, data: Mapping[str, Any], name: str, where: str, *, required: bool = True
    ) -> Any:
        value = data.get(name)
        if value is None:
            if required:
                raise self.fail(f"{where}{name}", "missing (a table)")
            return None
        if not isinstance(value, dict):
            raise self.fail(f"{where}{name}", f"must be a table, not {value!r}")
        return value

    def array(self, data: Mapping[str, Any], name: str, where: str) -> list[Any]:
        value = data.get(name, [])
        if not isinstance(value, list):
            raise self.fail(f"{where}{name}", "must be an array of tables ([[...]])")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{where}{name}[{index}]", "must be a table")
        return value

    def string(
        self, data: Mapping[str, Any], name: str, where: str, default: str | None = None
    ) -> str:
        value = data.get(name, default)
        if value is None:
            raise self.fail(f"{where}{name}", "missing (a string)")
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{where}{name}", f"must be a non-empty string, not {value!r}")
        return value

    def integer(
        self,
        data: Mapping[str, Any],
        name: str,
        where: str,
        default: int | None = None,
        *,
        minimum: int | None = 0,
        maximum: int | None = None,
    ) -> int:
        value = data.get(name, default)
        if value is None:
            raise self.fail(f"{where}{name}", "missing (a whole number)")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"{where}{name}", f"must be a whole number, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(f"{where}{name}", f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise self.fail(f"{where}{name}", f"must be at most {maximum}, not {value}")
        return value

    def optional_integer(self, data: Mapping[str, Any], name: str, where: str) -> int | None:
        return None if data.get(name) is None else self.integer(data, name, where)

    def unknown(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        extra = sorted(set(data) - allowed)
        if extra:
            raise self.fail(
                f"{where}{extra[0]}",
                f"unknown field (expected one of {', '.join(sorted(allowed))})",
            )

    def series(
        self, data: Mapping[str, Any], name: str, where: str, years: range
    ) -> dict[int, int]:
        value = data.get(name)
        field = f"{where}{name}"
        if value is None:
            raise self.fail(field, "missing (a table of year = tCO2e, or [first, last])")
        if isinstance(value, list):
            if len(value) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise self.fail(field, "a pair [first, last] of whole tCO2e is expected")
            first, last = value
            span = max(1, len(years) - 1)
            return {y: first + (last - first) * i // span for i, y in enumerate(years)}
        if not isinstance(value, dict):
            raise self.fail(field, "must be a table of year = tCO2e, or a pair [first, last]")
        result: dict[int, int] = {}
        for key, amount in value.items():
            if not key.isdigit() or int(key) not in years:
                raise self.fail(
                    f"{field}.{key}", f"must be a year of {years.start}-{years.stop - 1}"
                )
            if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
                raise self.fail(f"{field}.{key}", f"must be whole tCO2e, not {amount!r}")
            result[int(key)] = amount
        missing = [y for y in years if y not in result]
        if missing:
            raise self.fail(field, f"no value for {', '.join(map(str, missing))}")
        return result

    def years(self, data: Mapping[str, Any], where: str, first: int, last: int) -> range:
        if "year" in data and "years" in data:
            raise self.fail(f"{where}years", "give either 'year' or 'years', not both")
        if "year" in data:
            year = self.integer(data, "year", where, minimum=first, maximum=last)
            return range(year, year + 1)
        value = data.get("years")
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise self.fail(f"{where}years", f"must be a pair [from, to], not {value!r}")
        start, stop = value
        if not first <= start <= stop <= last:
            raise self.fail(
                f"{where}years", f"[{start}, {stop}] must be an ordered range within {first}-{last}"
            )
        return range(start, stop + 1)


def load_scenario(path: Path | str) -> Scenario:
    """Read and check a scenario file."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{name}: no such scenario file") from None
    return parse_scenario(text, name)


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    """Parse scenario TOML ``text``; ``path`` names it in errors."""
    r = _Reader(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    r.unknown(
        data,
        {"scenario", "parties", "activities", "authorisations", "issuances", "transfers", "uses"},
        "",
    )
    head = r.table(data, "scenario", "")
    r.unknown(head, {"name", "description", "first_year", "last_year"}, "scenario.")
    first = r.integer(head, "first_year", "scenario.", 2021, minimum=FIRST_VINTAGE)
    last = r.integer(head, "last_year", "scenario.", 2030, minimum=first)
    scenario_years = range(first, last + 1)

    parties = tuple(
        _party(r, item, f"parties[{i}].", scenario_years)
        for i, item in enumerate(r.array(data, "parties", ""))
    )
    if len(parties) < 2:
        raise r.fail("parties", "a scenario needs at least two parties")
    codes = [p.code for p in parties]
    for i, code in enumerate(codes):
        if code in codes[:i]:
            raise r.fail(f"parties[{i}].code", f"{code} is listed twice")
    registries = [p.registry for p in parties]
    for i, registry in enumerate(registries):
        if registry in registries[:i]:
            raise r.fail(f"parties[{i}].registry", f"{registry} is used twice")

    activities: list[Activity] = []
    for i, item in enumerate(r.array(data, "activities", "")):
        where = f"activities[{i}]."
        r.unknown(
            item, {"id", "name", "host", "mitigation_per_year", "first_year", "last_year"}, where
        )
        activity_id = r.string(item, "id", where)
        if any(a.id == activity_id for a in activities):
            raise r.fail(f"{where}id", f"{activity_id} is listed twice")
        host = r.string(item, "host", where)
        if host not in codes:
            raise r.fail(f"{where}host", f"{host} is not a party of this scenario")
        a_first = r.integer(item, "first_year", where, first, minimum=first, maximum=last)
        activities.append(
            Activity(
                id=activity_id,
                name=r.string(item, "name", where, activity_id),
                host=host,
                mitigation_per_year=r.integer(item, "mitigation_per_year", where, minimum=1),
                first_year=a_first,
                last_year=r.integer(item, "last_year", where, last, minimum=a_first, maximum=last),
            )
        )
    if not activities:
        raise r.fail("activities", "a scenario needs at least one activity")
    by_activity = {a.id: a for a in activities}

    authorisations: list[AuthorisationSpec] = []
    for i, item in enumerate(r.array(data, "authorisations", "")):
        where = f"authorisations[{i}]."
        r.unknown(
            item,
            {"id", "activity", "cooperative_approach", "acquiring", "purposes", "vintage_from",
             "vintage_to", "quantity_cap", "buyer_share_bp", "oimp_detail", "first_transfer"},
            where,
        )  # fmt: skip
        key = r.string(item, "id", where)
        if any(a.id == key for a in authorisations):
            raise r.fail(f"{where}id", f"{key} is listed twice")
        activity = by_activity.get(r.string(item, "activity", where))
        if activity is None:
            raise r.fail(f"{where}activity", f"{item['activity']} is not an activity id")
        acquiring = item.get("acquiring")
        if not isinstance(acquiring, list) or not acquiring:
            raise r.fail(f"{where}acquiring", "must be a non-empty array of party codes")
        for j, party in enumerate(acquiring):
            if party not in codes:
                raise r.fail(f"{where}acquiring[{j}]", f"{party!r} is not a party of this scenario")
            if party == activity.host:
                raise r.fail(f"{where}acquiring[{j}]", f"{party} is the host itself")
        purposes = item.get("purposes", ["NDC"])
        if purposes not in (["NDC"], ["OIMP"], ["NDC", "OIMP"], ["OIMP", "NDC"]):
            raise r.fail(f"{where}purposes", 'must be ["NDC"], ["OIMP"] or ["NDC", "OIMP"]')
        purposes = sorted(purposes)
        oimp = "OIMP" in purposes
        if not oimp:
            for name in ("oimp_detail", "first_transfer"):
                if name in item:
                    raise r.fail(f"{where}{name}", "only for units authorised for OIMP")
        point = r.string(item, "first_transfer", where) if oimp else ""
        if oimp and point not in FIRST_TRANSFER_POINTS:
            raise r.fail(
                f"{where}first_transfer", f"must be one of {', '.join(FIRST_TRANSFER_POINTS)}"
            )
        v_from = r.integer(
            item, "vintage_from", where, activity.first_year,
            minimum=activity.first_year, maximum=activity.last_year,
        )  # fmt: skip
        v_to = r.integer(
            item, "vintage_to", where, activity.last_year, minimum=v_from,
            maximum=activity.last_year,
        )  # fmt: skip
        share = r.integer(item, "buyer_share_bp", where, 0, maximum=10_000)
        if share and len(set(acquiring)) != 1:
            raise r.fail(f"{where}buyer_share_bp", "a buyer's share needs exactly one acquirer")
        authorisations.append(
            AuthorisationSpec(
                id=key,
                activity=activity.id,
                host=activity.host,
                cooperative_approach=r.string(item, "cooperative_approach", where),
                acquiring=tuple(dict.fromkeys(acquiring)),
                purposes=tuple(purposes),
                vintage_from=v_from,
                vintage_to=v_to,
                quantity_cap=r.integer(item, "quantity_cap", where, 0),
                buyer_share_bp=share,
                oimp_detail=r.string(item, "oimp_detail", where, "CORSIA") if oimp else "",
                first_transfer=point,
            )
        )
    by_key = {a.id: a for a in authorisations}

    def spec_of(item: Mapping[str, Any], where: str) -> AuthorisationSpec:
        spec = by_key.get(r.string(item, "authorisation", where))
        if spec is None:
            raise r.fail(
                f"{where}authorisation", f"{item['authorisation']} is not an authorisation id"
            )
        return spec

    def vintage(item: Mapping[str, Any], where: str, spec: AuthorisationSpec, year: int) -> int:
        offset = r.integer(item, "vintage_offset", where, 0, minimum=None, maximum=0)
        v = year + offset
        if not spec.vintage_from <= v <= spec.vintage_to:
            raise r.fail(
                f"{where}years",
                f"year {year} gives vintage {v}, outside the authorisation's "
                f"{spec.vintage_from}-{spec.vintage_to}",
            )
        return v

    issuances: list[Issuance] = []
    for i, item in enumerate(r.array(data, "issuances", "")):
        where = f"issuances[{i}]."
        r.unknown(item, {"authorisation", "year", "years", "quantity", "vintage_offset"}, where)
        spec = spec_of(item, where)
        activity = by_activity[spec.activity]
        quantity = r.integer(item, "quantity", where, activity.mitigation_per_year, minimum=1)
        for year in r.years(item, where, first, last):
            issuances.append(Issuance(year, spec.id, vintage(item, where, spec, year), quantity))
        issued_per_vintage: dict[tuple[str, int], int] = defaultdict(int)
        for issuance in issuances:
            activity_id = by_key[issuance.authorisation].activity
            issued_per_vintage[activity_id, issuance.vintage] += issuance.quantity
            if (
                issued_per_vintage[activity_id, issuance.vintage]
                > by_activity[activity_id].mitigation_per_year
            ):
                raise r.fail(
                    f"{where}quantity",
                    f"issuing {issued_per_vintage[activity_id, issuance.vintage]} tCO2e of "
                    f"vintage {issuance.vintage} of {activity_id}, more than its mitigation of "
                    f"{by_activity[activity_id].mitigation_per_year} a year",
                )
        if (
            spec.quantity_cap
            and sum(x.quantity for x in issuances if x.authorisation == spec.id) > spec.quantity_cap
        ):
            raise r.fail(f"{where}quantity", f"more than the quantity_cap of {spec.id}")

    transfers: list[Transfer] = []
    transfer_where: list[str] = []
    for i, item in enumerate(r.array(data, "transfers", "")):
        where = f"transfers[{i}]."
        r.unknown(
            item,
            {"authorisation", "to", "from", "year", "years", "quantity", "vintage_offset"},
            where,
        )
        spec = spec_of(item, where)
        to = r.string(item, "to", where)
        if to not in spec.acquiring:
            raise r.fail(f"{where}to", f"{to} is not an acquiring party of {spec.id}")
        sender = r.string(item, "from", where, spec.host)
        if sender != spec.host and sender not in spec.acquiring:
            raise r.fail(
                f"{where}from",
                f"{sender} is neither the host nor an acquiring party of {spec.id}",
            )
        if sender == to:
            raise r.fail(f"{where}from", f"{sender} cannot transfer to itself")
        quantity = r.integer(item, "quantity", where, minimum=1)
        for year in r.years(item, where, first, last):
            transfers.append(
                Transfer(year, spec.id, sender, to, vintage(item, where, spec, year), quantity)
            )
            transfer_where.append(where)

    uses: list[Use] = []
    use_where: list[str] = []
    for i, item in enumerate(r.array(data, "uses", "")):
        where = f"uses[{i}]."
        r.unknown(
            item,
            {"party", "authorisation", "year", "years", "quantity", "vintage_offset", "action"},
            where,
        )
        spec = spec_of(item, where)
        action = r.string(item, "action", where, "use-ndc" if spec.ndc else "use-oimp")
        if action not in USE_ACTIONS:
            raise r.fail(f"{where}action", f"must be one of {', '.join(USE_ACTIONS)}")
        if (action == "use-ndc" and not spec.ndc) or (action == "use-oimp" and not spec.for_oimp):
            what = "OIMP" if spec.oimp_only else "NDC"
            raise r.fail(f"{where}action", f"{spec.id} authorises its units for {what} use only")
        party_code = r.string(item, "party", where)
        toward_ndc = action == "use-ndc"
        if party_code not in spec.acquiring and not (not toward_ndc and party_code == spec.host):
            raise r.fail(f"{where}party", f"{party_code} is not an acquiring party of {spec.id}")
        ndc_years = next(p.ndc.years for p in parties if p.code == party_code)
        quantity = r.integer(item, "quantity", where, minimum=1)
        for year in r.years(item, where, first, last):
            if year not in ndc_years and toward_ndc:
                raise r.fail(f"{where}years", f"{year} is outside the NDC period of {party_code}")
            uses.append(
                Use(
                    year, spec.id, party_code, vintage(item, where, spec, year), quantity,
                    action,
                )
            )  # fmt: skip
            use_where.append(where)
    _check_schedule(
        r, issuances, list(zip(transfers, transfer_where, strict=True)),
        list(zip(uses, use_where, strict=True)), by_key,
    )  # fmt: skip

    scenario = Scenario(
        path=path,
        name=r.string(head, "name", "scenario."),
        description=str(head.get("description", "")),
        first_year=first,
        last_year=last,
        parties=parties,
        activities=tuple(activities),
        authorisations=tuple(authorisations),
        issuances=tuple(sorted(issuances, key=lambda x: x.year)),
        transfers=tuple(sorted(transfers, key=lambda x: x.year)),
        uses=tuple(sorted(uses, key=lambda x: x.year)),
    )
    for i, party in enumerate(parties):
        for year in {x.vintage for x in issuances if by_key[x.authorisation].host == party.code}:
            if year not in party.ndc.years:
                raise r.fail(f"parties[{i}].ndc", f"vintage {year} is outside the NDC period")
    return scenario


def _check_schedule(
    r: _Reader,
    issuances: list[Issuance],
    transfers: list[tuple[Transfer, str]],
    uses: list[tuple[Use, str]],
    specs: Mapping[str, AuthorisationSpec],
) -> None:
    """Play the schedule on paper, in the runner's order within each year (issuances,
    first transfers, onward transfers, uses), and refuse the first step that moves
    units a party does not hold by then. Onward transfers of one year are played in
    any order, so what a party receives by one of them counts only after all of them.
    """
    held: dict[tuple[str, str, int], int] = defaultdict(int)  # (party, authorisation, vintage)

    def take(where: str, party: str, what: str, key: tuple[str, str, int], quantity: int) -> None:
        if held[key] < quantity:
            _, authorisation, vintage = key
            raise r.fail(
                f"{where}quantity",
                f"by {year} {party} would {what} {quantity} tCO2e of vintage {vintage} of "
                f"{authorisation} but holds only {held[key]}",
            )
        held[key] -= quantity

    for year in sorted({x.year for x in issuances} | {t.year for t, _ in transfers}
                       | {u.year for u, _ in uses}):  # fmt: skip
        for issuance in (x for x in issuances if x.year == year):
            spec = specs[issuance.authorisation]
            split = split_issuance(
                UnitType.ITMO, issuance.quantity, IssuancePolicy(spec.buyer_share_bp, 0)
            )
            held[spec.host, spec.id, issuance.vintage] += split.host_holding
            if split.buyer_share:
                held[spec.acquiring[0], spec.id, issuance.vintage] += split.buyer_share
        for onward in (False, True):
            arriving: dict[tuple[str, str, int], int] = defaultdict(int)
            for transfer, where in transfers:
                spec = specs[transfer.authorisation]
                if transfer.year != year or (transfer.from_party != spec.host) != onward:
                    continue
                key = (transfer.from_party, spec.id, transfer.vintage)
                take(where, transfer.from_party, "transfer", key, transfer.quantity)
                arriving[transfer.to_party, spec.id, transfer.vintage] += transfer.quantity
            for key, quantity in arriving.items():
                held[key] += quantity
        for use, where in uses:
            if use.year != year:
                continue
            what = "cancel" if use.action == "voluntary-cancellation" else "use"
            take(where, use.party, what, (use.party, use.authorisation, use.vintage), use.quantity)


def _party(r: _Reader, item: Mapping[str, Any], where: str, years: range) -> Party:
    r.unknown(item, {"code", "name", "registry", "ndc", "threshold"}, where)
    code = r.string(item, "code", where)
    try:
        check_party_code(code)
    except ValueError as exc:
        raise r.fail(f"{where}code", str(exc)) from None
    registry = r.string(item, "registry", where, f"{code}-NR")
    try:
        check_registry_id(registry)
    except ValueError as exc:
        raise r.fail(f"{where}registry", str(exc)) from None
    ndc_table = r.table(item, "ndc", where)
    nw = f"{where}ndc."
    r.unknown(
        ndc_table,
        {"method", "first_year", "last_year", "target_year", "target_emissions", "trajectory",
         "reported_emissions", "baseline_year", "baseline_emissions"},
        nw,
    )  # fmt: skip
    method = ndc_table.get("method")
    if method not in METHODS:
        raise r.fail(f"{nw}method", f"must be one of {', '.join(METHODS)}, not {method!r}")
    n_first = r.integer(ndc_table, "first_year", nw, years.start, minimum=FIRST_VINTAGE)
    n_last = r.integer(ndc_table, "last_year", nw, years.stop - 1, minimum=n_first)
    period = range(n_first, n_last + 1)
    target_year: int | None = None
    trajectory: dict[int, int] = {}
    target = 0
    if method == AccountingMethod.AVERAGING.value:
        target_year = r.integer(ndc_table, "target_year", nw, minimum=n_first, maximum=n_last)
        target = r.integer(ndc_table, "target_emissions", nw)
    elif method == AccountingMethod.BUDGET.value:
        target = r.integer(ndc_table, "target_emissions", nw)
    else:
        trajectory = r.series(ndc_table, "trajectory", nw, period)
    threshold_table = r.table(item, "threshold", where, required=False)
    threshold = None
    if threshold_table is not None:
        tw = f"{where}threshold."
        r.unknown(threshold_table, {"per_year", "per_period"}, tw)
        threshold = Threshold(
            per_year=r.optional_integer(threshold_table, "per_year", tw),
            per_period=r.optional_integer(threshold_table, "per_period", tw),
        )
    return Party(
        code=code,
        name=r.string(item, "name", where, code),
        registry=registry,
        ndc=Ndc(
            method=method,
            first_year=n_first,
            last_year=n_last,
            target_emissions=target,
            target_year=target_year,
            trajectory=trajectory,
            reported_emissions=r.series(ndc_table, "reported_emissions", nw, period),
            baseline_year=r.optional_integer(ndc_table, "baseline_year", nw),
            baseline_emissions=r.optional_integer(ndc_table, "baseline_emissions", nw),
        ),
        threshold=threshold,
    )
