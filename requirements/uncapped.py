"""Print pyproject.toml's dependencies (and those of the extras named after it) without their
upper bounds, one requirement a line, for ``make test-latest UNCAPPED=1``: the newest releases,
including those beyond the tested range, can then be tried before the range is widened.

    python requirements/uncapped.py pyproject.toml dev > uncapped.txt
"""

from __future__ import annotations

import re
import sys
import tomllib

#: clauses that cap a release from above; ``~=X.Y`` becomes ``>=X.Y``
UPPER = re.compile(r"^\s*(<|<=|==|===)")


def uncapped(requirement: str) -> str:
    """``requirement`` with its upper-bound clauses dropped (markers kept)."""
    body, _, marker = requirement.partition(";")
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)\s*(.*)$", body)
    if not match:
        raise SystemExit(f"uncapped.py: cannot read the requirement {requirement!r}")
    name, specs = match.groups()
    kept = []
    for clause in filter(None, (c.strip() for c in specs.split(","))):
        if UPPER.match(clause):
            continue
        kept.append(">=" + clause[2:].strip() if clause.startswith("~=") else clause)
    line = name + ",".join(kept)
    return f"{line}; {marker.strip()}" if marker.strip() else line


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: uncapped.py PYPROJECT [EXTRA ...]")
    with open(argv[0], "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project.get("dependencies", []))
    for extra in argv[1:]:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    print("\n".join(uncapped(r) for r in requirements))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
