"""Quality-Gate: select instruction-tuning data with learned per-layer quality gates."""

__version__ = "0.1.0"
