"""`patchscope batch`: explain captured states in bulk, resumably, through the one Explain pipeline.

inputs.py and vllm.py read files into rows (or refuse them with a reason); options.py is the job; worker.py
runs one part's files through `patchscope.explain`; parts.py keeps each finished part on disk; job.py runs
the parts in this process and ray_data.py on Ray Data actors.
"""

from patchscope.batch.inputs import FileRows, InputLimits, Refusal, Refused, read_file
from patchscope.batch.job import Summary, run_local
from patchscope.batch.options import BatchOptions, parse_target_layers
from patchscope.batch.schema import COLUMNS, SCHEMA
from patchscope.batch.worker import Worker

__all__ = [
    "COLUMNS",
    "SCHEMA",
    "BatchOptions",
    "FileRows",
    "InputLimits",
    "Refusal",
    "Refused",
    "Summary",
    "Worker",
    "parse_target_layers",
    "read_file",
    "run_local",
]
