"""Generate the README's config reference from configs/*.yaml (keys, defaults, comments).

    python scripts/gen_config_docs.py           # rewrite the README section in place
    python scripts/gen_config_docs.py --check   # exit 1 if the README is out of date

The section lies between ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->``.
Each key's meaning is the comment at the end of its line in the YAML file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.-]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def parse_keys(text: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every key outside the ``hydra`` block, in file order."""
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw.lstrip().startswith("- "):
            if rows and rows[-1][1] == "":
                key, _, comment = rows[-1]
                rows[-1] = (key, "(list)", comment)
            continue
        m = LINE.match(raw)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m["key"]])
        stack.append((indent, m["key"]))
        if key == "hydra" or key.startswith("hydra.") or key == "defaults":
            continue
        rows.append((key, m["value"].strip(), (m["comment"] or "").strip()))
    return [r for r in rows if r[1] != "" or r[2]]


def render() -> str:
    parts = [START, ""]
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0].lstrip("# ").strip() if text else ""
        parts += [
            f"#### `configs/{path.name}`",
            "",
            f"`{first}`",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for key, value, comment in parse_keys(text):
            value = value.replace("|", "\\|") or "(section)"
            parts.append(f"| `{key}` | `{value}` | {comment.replace('|', '/')} |")
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} section", file=sys.stderr)
        return 1
    new = text[: text.index(START)] + render() + text[text.index(END) + len(END) :]
    if args.check:
        if new != text:
            print("README.md's config reference is out of date: run python scripts/gen_config_docs.py")
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
