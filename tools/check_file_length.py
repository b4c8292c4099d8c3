"""Fail when a source file grows past the style guide's limit (STYLE.md rule 24: about 600 lines)."""

import pathlib
import sys

LIMIT = 650
ROOTS = ("visionattn", "tools", "tests")


def main() -> int:
    repo = pathlib.Path(__file__).resolve().parent.parent
    too_long = []
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            n = sum(1 for _ in path.open(encoding="utf-8"))
            if n > LIMIT:
                too_long.append(f"{path.relative_to(repo)}: {n} lines")
    if too_long:
        print(f"files over {LIMIT} lines (split them by responsibility):", *too_long, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
