"""Training data: reading rows, synthetic tasks, chat templating with loss masks, packing, traces.

    io         read_rows: JSONL / Parquet / saved dataset -> normalised rows, with a report
    synthetic  synthesize: built-in verifiable reasoning tasks
    chat       tokenize_rows: rows -> input_ids + loss_mask through the chat template
    packing    pack / batches / pad_batch: examples -> fixed windows -> reproducible batches
    traces     generate_traces: rejection-sampled teacher solutions (imported from its module:
               it uses hybridize.evaluate, which itself reads data through this package)
"""

from hybridize.data.chat import TokenizeReport, tokenize_row, tokenize_rows
from hybridize.data.io import DataError, ReadReport, read_rows
from hybridize.data.packing import batches, pack, pad_batch
from hybridize.data.synthetic import synthesize, write_jsonl

__all__ = ["DataError", "ReadReport", "TokenizeReport", "batches", "pack", "pad_batch", "read_rows",
           "synthesize", "tokenize_row", "tokenize_rows", "write_jsonl"]
