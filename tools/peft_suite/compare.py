"""Tests that pass in the baseline junit XML and fail (or error) in the fused one.

    python tools/peft_suite/compare.py baseline.xml fused.xml
"""

import sys
import xml.etree.ElementTree as ET


def outcomes(path):
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        result[name] = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    return result


def main(argv):
    base, fused = outcomes(argv[1]), outcomes(argv[2])
    broken = sorted(n for n, o in base.items() if o == "passed" and fused.get(n) == "failed")
    counts = {k: sum(o == k for o in fused.values()) for k in ("passed", "failed", "skipped")}
    print(f"baseline: {len(base)} tests; fused: {counts}; pass unfused, fail fused: {len(broken)}")
    for name in broken:
        print("  ", name)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
