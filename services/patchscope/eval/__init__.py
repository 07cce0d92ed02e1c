"""Reproductions of the Patchscopes paper's experiments on the embedded models (`patchscope eval ...`).

Each experiment is one module with a `run(...)` that returns a JSON-ready result (every number the
results page shows, and the raw generations it was computed from) and a `plot(...)` (next token's in
`next_token_plots.py`); `report.py` renders
`docs/results.md` from the saved results, so no number on that page is typed by hand.
"""
