"""Counts of one pytest lane from its JUnit XML, and a check that named tests really ran.

    python .ci/junit_counts.py REPORT.xml LANE [--must-run tests/x.py::test_y ...]

Prints `LANE: N passed, N failed, N skipped` and exits 1 when a test failed or errored, when
none ran, or when a --must-run test is missing or was skipped: a lane whose reason to exist
is one test (the Megatron-LM path on megatron-core 0.19) must not go green by skipping it.
"""

import argparse
import sys
import xml.etree.ElementTree as ET


def node_id(case) -> str:
    """pytest's node id (tests/a/b.py::name[param]) from JUnit's classname and name."""
    return case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report")
    parser.add_argument("lane")
    parser.add_argument("--must-run", action="append", default=[], metavar="NODE_ID")
    args = parser.parse_args(argv)

    outcome = {}
    for case in ET.parse(args.report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome[node_id(case)] = ("failed" if kinds & {"failure", "error"} else
                                  "skipped" if "skipped" in kinds else "passed")
    counts = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "skipped")}
    print(f"{args.lane}: {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped")

    problems = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} failed")
    if not counts["passed"]:
        problems.append("no test passed")
    for wanted in args.must_run:
        got = outcome.get(wanted, "missing")
        if got != "passed":
            problems.append(f"{wanted} {got} (this lane must run it)")
    for problem in problems:
        print(f"{args.lane}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
