"""The data layer: rows -> records -> encoded samples -> padded batches."""

from quality_gate.data.batching import SFTDataCollator, pad_batch, to_hf_dataset, token_budget_batches
from quality_gate.data.encode import (
    IGNORE_INDEX,
    EncodedSample,
    EncodeStats,
    encode_record,
    encode_records,
    ensure_chat_template,
)
from quality_gate.data.records import BadRecord, normalize_record
from quality_gate.data.sources import (
    SkippedRow,
    load_hf_dataset,
    load_local_file,
    load_records,
    records_fingerprint,
)

__all__ = [
    "IGNORE_INDEX",
    "BadRecord",
    "EncodeStats",
    "EncodedSample",
    "SFTDataCollator",
    "SkippedRow",
    "encode_record",
    "encode_records",
    "ensure_chat_template",
    "load_hf_dataset",
    "load_local_file",
    "load_records",
    "normalize_record",
    "pad_batch",
    "records_fingerprint",
    "to_hf_dataset",
    "token_budget_batches",
]
