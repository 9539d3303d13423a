"""A conformance run's results: terminal summary, JUnit XML and Markdown."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from itmolink.conformance.runner import ERROR, FAILED, NOT_RUN, PASSED, Result, RunReport
from itmolink.conformance.stages import STAGES

MARK = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR", NOT_RUN: "----"}
ROLE_TEXT = {
    "host": "host (the target transfers out; the kit plays the acquiring party)",
    "buyer": "buyer (the target acquires; the kit plays the host)",
}


def result_line(result: Result) -> str:
    line = (
        f"{MARK[result.status]:5} {result.test.id:42} {result.test.section:22} "
        f"{result.seconds:6.2f}s"
    )
    if result.status in (FAILED, ERROR):
        line += f"\n      {result.message}"
    return line


def summary(report: RunReport) -> str:
    counts = {s: len(report.by_status(s)) for s in (PASSED, FAILED, ERROR, NOT_RUN)}
    lines = [
        f"target {report.target} ({report.target_party}) as {ROLE_TEXT[report.role]}",
    ]
    for stage, name in sorted(STAGES.items()):
        lines.append(f"  stage {stage} ({name}): {report.stage_status(stage)}")
    lines.append(
        f"{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[ERROR]} errors, "
        f"{counts[NOT_RUN]} not run, in {report.seconds:.1f} s: "
        + ("CONFORMS" if report.passed else "DOES NOT CONFORM")
    )
    return "\n".join(lines)


def junit_xml(report: RunReport) -> bytes:
    root = ET.Element(
        "testsuites",
        name=f"itmolink conformance ({report.role})",
        tests=str(len(report.results)),
        failures=str(len(report.by_status(FAILED))),
        errors=str(len(report.by_status(ERROR))),
        skipped=str(len(report.by_status(NOT_RUN))),
        time=f"{report.seconds:.3f}",
    )
    for stage, name in sorted(STAGES.items()):
        results = [r for r in report.results if r.test.stage == stage]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"stage {stage}: {name}",
            tests=str(len(results)),
            failures=str(sum(r.status == FAILED for r in results)),
            errors=str(sum(r.status == ERROR for r in results)),
            skipped=str(sum(r.status == NOT_RUN for r in results)),
            time=f"{sum(r.seconds for r in results):.3f}",
            timestamp=report.started.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        for r in results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"conformance.{report.role}.stage{stage}",
                name=f"{r.test.id} [{r.test.section}]",
                time=f"{r.seconds:.3f}",
            )
            if r.status == FAILED:
                ET.SubElement(case, "failure", message=r.message[:500]).text = r.message
            elif r.status == ERROR:
                ET.SubElement(case, "error", message=r.message[:500]).text = r.message
            elif r.status == NOT_RUN:
                ET.SubElement(case, "skipped", message=f"not run: {r.message}")
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def markdown(report: RunReport) -> str:
    out = [
        "# itmolink conformance report",
        "",
        f"- Target: `{report.target}`, party {report.target_party}, as {ROLE_TEXT[report.role]}",
        f"- Kit party: {report.kit_party}",
        f"- Started: {report.started:%Y-%m-%d %H:%M:%S} UTC, {report.seconds:.1f} s",
        f"- Outcome: **{'conforms' if report.passed else 'does not conform'}** "
        f"({len(report.by_status(PASSED))} of {len(report.results)} tests passed)",
        "",
        "Sections refer to docs/PROTOCOL.md. A stage runs only when every test of the "
        "previous stages passed.",
    ]
    for stage, name in sorted(STAGES.items()):
        results = [r for r in report.results if r.test.stage == stage]
        out += [
            "",
            f"## Stage {stage}: {name} ({report.stage_status(stage)})",
            "",
            "| Result | Test | Section | Checks | Seconds |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            out.append(
                f"| {MARK[r.status]} | `{r.test.id}` | {r.test.section} | {_cell(r.test.title)} "
                f"| {r.seconds:.2f} |"
            )
        problems = [r for r in results if r.status in (FAILED, ERROR)]
        if problems:
            out.append("")
            for r in problems:
                out.append(f"- `{r.test.id}`: {_cell(r.message)}")
    if report.driver_log:
        out += ["", "## Driver commands", "", "```"]
        out += report.driver_log
        out.append("```")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
