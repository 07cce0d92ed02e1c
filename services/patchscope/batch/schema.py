"""The batch job's output table: one row per explained site, as a fixed Parquet schema.

Fixed, so parts written by different runs, processes or Ray workers concatenate into one table. The
faithfulness signals (controls, confidence) are filled from the pipeline's results when it computes them
and null otherwise, so a table from before the controls existed reads the same way.
"""

from __future__ import annotations

import json

import pyarrow as pa

from patchscope.explain.events import SiteResult

# What the pipeline's SiteResult may carry beside the explanation (the controls of every site).
SIGNALS: tuple[tuple[str, pa.DataType], ...] = (
    ("unpatched_explanation", pa.string()),
    ("unpatched_answer", pa.string()),
    ("same_as_unpatched", pa.bool_()),
    ("patch_effect", pa.float64()),
    ("dependence", pa.float64()),
    ("confidence", pa.float64()),
)

SCHEMA = pa.schema(
    [
        ("input_file", pa.string()),
        ("input_sha256", pa.string()),
        ("request_id", pa.string()),
        ("row", pa.int32()),  # the row of the input file
        ("position", pa.int32()),  # absolute, BOS counted; null when the file does not say
        ("token", pa.string()),
        ("source_layer", pa.int32()),
        ("target_layer", pa.int32()),
        ("explanation", pa.string()),
        ("answer", pa.string()),
        *SIGNALS,
        ("mapping_id", pa.string()),
        ("mapping_r2", pa.float64()),
        ("top_k", pa.list_(pa.struct([("token", pa.string()), ("prob", pa.float64())]))),
        ("provenance_mismatch", pa.bool_()),  # the file's fingerprint is not the source's
        ("reproduction", pa.string()),  # JSON: everything needed to rerun this one site
    ]
)
COLUMNS = tuple(SCHEMA.names)
KEY = ("input_file", "row")  # unique per table: every input row exactly once


def row_record(
    result: SiteResult,
    *,
    file: str,
    sha256: str,
    request_id: str | None,
    row: int,
    position: int | None,
    token: str,
    provenance_mismatch: bool,
    reproduction: dict,
) -> dict:
    """One output row from one site's result and where its state came from."""
    record = {
        "input_file": file,
        "input_sha256": sha256,
        "request_id": request_id,
        "row": row,
        "position": position,
        "token": token,
        "source_layer": result.site.source_layer,
        "target_layer": result.site.target_layer,
        "explanation": result.explanation,
        "answer": result.answer,
        "mapping_id": result.mapping_id,
        "mapping_r2": result.mapping_r2,
        "top_k": None if result.top_k is None else [{"token": t, "prob": p} for t, p in result.top_k],
        "provenance_mismatch": provenance_mismatch,
        "reproduction": json.dumps(reproduction, sort_keys=True, ensure_ascii=False),
    }
    # The signals travel in the result's `control` (None when controls are off or for the logit lens).
    control = getattr(result, "control", None)
    for name, _ in SIGNALS:
        record[name] = getattr(control, name, None)
    return record


def table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=SCHEMA)
