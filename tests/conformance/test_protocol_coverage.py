"""docs/PROTOCOL.md documents every element of proto/itmolink/v1: each message,
each of its fields, each enum and enum value, the service and its methods, and
lists each message, enum and service in Appendix A.

Read from the generated modules' descriptors, so a message or field added to
the proto (and regenerated, as CI requires) without documentation fails here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import itmolink.v1

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def proto_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"itmolink.v1.{m.name}")
        for m in pkgutil.iter_modules(itmolink.v1.__path__)
        if m.name.endswith("_pb2")
    ]


def sections(text: str) -> list[str]:
    """The document cut at every heading of level 2 to 4."""
    return re.split(r"(?m)^(?=#{2,4} )", text)


def appendix(text: str) -> str:
    return text[text.index("## Appendix A") :]


def undocumented(text: str) -> list[str]:
    """Every proto element that ``text`` fails to document."""
    parts = sections(text)
    index = appendix(text)
    missing: list[str] = []
    for module in proto_modules():
        file = module.DESCRIPTOR
        proto = Path(file.name).name
        for message in file.message_types_by_name.values():
            about = [
                p for p in parts if re.search(rf"`{message.name}`|message {message.name}\b", p)
            ]
            if not about:
                missing.append(f"message {message.name} ({proto})")
                continue
            for f in message.fields:
                # The field is named, in a section about its message, in backquotes or
                # in a proto listing ("key_id = 1;").
                if not any(
                    f"`{f.name}`" in p or re.search(rf"\b{f.name} = {f.number};", p) for p in about
                ):
                    missing.append(f"field {message.name}.{f.name} ({proto})")
            if not re.search(rf"\| `{message.name}`[^|]*\| message", index):
                missing.append(f"message {message.name} not in Appendix A")
        for enum in file.enum_types_by_name.values():
            if not re.search(rf"\| `{enum.name}` \| enum", index):
                missing.append(f"enum {enum.name} not in Appendix A")
            for value in enum.values:
                if value.name not in text:
                    missing.append(f"enum value {enum.name}.{value.name} ({proto})")
        for service in file.services_by_name.values():
            if not re.search(rf"\| `{service.name}` \| service", index):
                missing.append(f"service {service.name} not in Appendix A")
            for method in service.methods:
                if f"rpc {method.name}(" not in text:
                    missing.append(f"rpc {service.name}.{method.name} ({proto})")
    return missing


def test_protocol_md_documents_every_message_field_and_enum_value() -> None:
    missing = undocumented(PROTOCOL.read_text())
    assert not missing, "docs/PROTOCOL.md does not document:\n  " + "\n  ".join(missing)


def test_the_check_finds_an_undocumented_field() -> None:
    """Take one field's every mention out of the text: the check must notice."""
    text = PROTOCOL.read_text().replace("`quantity_cap`", "`cap`")
    text = re.sub(r"\bquantity_cap = 13;", "cap = 13;", text)
    assert "field AuthorisationStatement.quantity_cap (authorisation.proto)" in undocumented(text)
    text = PROTOCOL.read_text().replace("| `TransferVoid` |", "| `Void` |")
    assert "message TransferVoid not in Appendix A" in undocumented(text)


def test_every_message_is_covered_by_some_proto_module() -> None:
    """The descriptors read above are the protocol's: all of proto/itmolink/v1."""
    root = PROTOCOL.parents[1] / "proto" / "itmolink" / "v1"
    files = {p.name for p in root.glob("*.proto")}
    assert files == {Path(m.DESCRIPTOR.name).name for m in proto_modules()}


def test_protocol_md_lists_every_conformance_test() -> None:
    from itmolink.conformance.stages import TESTS

    section = PROTOCOL.read_text().split("## 13. Conformance kit")[1].split("## Appendix A")[0]
    for test in TESTS:
        row = f"| `{test.id}` |"
        assert row in section, f"§13.4 does not list the kit test {test.id}"
        line = next(line for line in section.splitlines() if line.startswith(row))
        assert test.section in line, f"§13.4 gives another section for {test.id}"


def test_the_example_kit_configuration_names_every_driver_action() -> None:
    import tomllib

    from itmolink.conformance.driver import ACTIONS, Driver

    example = PROTOCOL.parents[1] / "conformance" / "partner.example.toml"
    data = tomllib.loads(example.read_text())
    commands = {k: v for k, v in data["driver"].items() if k != "vars"}
    driver = Driver(commands, data["driver"].get("vars", {}))
    for action, placeholders in ACTIONS.items():
        common = {"kit_party": "XKT", "target_party": "LAO", "kit_endpoint": "h:1"}
        command = driver.render(action, {**dict.fromkeys(placeholders, "1"), **common})
        assert "{" not in command, command
