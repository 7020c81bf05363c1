"""``python -m quality_gate <command> [key=value ...]``: the same as ``quality-gate``."""

from quality_gate.cli import main

main()
