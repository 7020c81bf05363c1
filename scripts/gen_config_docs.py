"""Generate docs/configuration.md from the typed schemas (quality_gate/config/).

    python scripts/gen_config_docs.py           # rewrite docs/configuration.md's section in place
    python scripts/gen_config_docs.py --check   # exit 1 if it is out of date

The section lies between ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->``.
Each key's default and meaning come from the schema's fields (``opt(default, help)``), so the
reference, ``quality-gate <stage> --help`` and the code cannot disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quality_gate.compat import CONFIG_STAGES  # noqa: E402

#: Config names that are the project's own; every other name in CONFIG_STAGES is one of the seed's.
OWN_CONFIGS = {"warmup", "collect", "select", "finetune", "evaluate", "experiment", "experiment_sweep"}
SEED_CONFIG_NAMES = set(CONFIG_STAGES) - OWN_CONFIGS
from quality_gate.config import ASSETS_NOTE, SCHEMAS, help_rows  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render() -> str:
    parts = [START, "", ASSETS_NOTE, ""]
    for stage, schema in SCHEMAS.items():
        names = sorted(name for name, s in CONFIG_STAGES.items() if s == stage and name != stage)
        seed = [n for n in names if n in SEED_CONFIG_NAMES]
        other = [n for n in names if n not in SEED_CONFIG_NAMES]
        alias_text = "".join(
            f"; {label}: {', '.join(f'`{a}`' for a in group)}"
            for label, group in (("also run as", other), ("the seed's names", seed))
            if group
        )
        parts += [
            f"#### `quality-gate {stage}`",
            "",
            f"{(schema.__doc__ or '').strip()} Config `{stage}.yaml`, schema "
            f"`{schema.__name__}`{alias_text}.",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for key, default, text in help_rows(schema):
            if key == "stage":
                continue
            parts.append(f"| `{key}` | `{default.replace('|', '/')}` | {text.replace('|', '/')} |")
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/configuration.md is out of date")
    args = ap.parse_args()
    readme = ROOT / "docs" / "configuration.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"docs/configuration.md has no {START} ... {END} section", file=sys.stderr)
        return 1
    new = text[: text.index(START)] + render() + text[text.index(END) + len(END) :]
    if args.check:
        if new != text:
            print("docs/configuration.md is out of date: run python scripts/gen_config_docs.py")
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
