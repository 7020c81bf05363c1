"""Pieces shared by the two training stages (Stage 1 warmup, Stage 3 fine-tune)."""

from __future__ import annotations


def validate_batch_size_configuration(
    total_batch_size: int, per_device_batch_size: int, world_size: int
) -> int:
    """Return the gradient accumulation steps for ``total = per_device x world_size x accumulation``.

    Raises ``ValueError`` naming the three numbers when ``total`` is not a multiple of
    ``per_device x world_size``.
    """
    for name, value in (
        ("training.batch_size", total_batch_size),
        ("training.per_device_batch_size", per_device_batch_size),
        ("world size", world_size),
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    effective = per_device_batch_size * world_size
    if total_batch_size % effective != 0:
        raise ValueError(
            f"training.batch_size={total_batch_size} is not a multiple of "
            f"training.per_device_batch_size={per_device_batch_size} x world size {world_size} "
            f"= {effective}. Choose a total batch size that is a multiple of {effective}, or change "
            "the per-device batch size."
        )
    return total_batch_size // effective
