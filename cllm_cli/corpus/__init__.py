"""The corpus: text files -> token array -> training windows.

    collect_files      paths given by the user -> list of text files (files.py)
    prepare_dataset    files -> vocabulary file + dataset.bin, built once and reused (dataset.py)
    load_dataset       dataset.bin -> read-only np.memmap of ids, checked
    dataset_header     the header of dataset.bin as a dict
    stream_key         the key dataset.bin records for a corpus tokenized with a given vocabulary
    split_stream, num_windows, epoch_order, gather_windows, eval_windows, spread_windows
                       the token array cut into windows (batches.py)
    is_instruction_data, prepare_instructions, split_records, load_instructions,
    read_records, Instructions
                       .jsonl records -> labelled windows, one per record (instructions.py)

The modules below import one another directly, never this package face.
"""
from cllm_cli.corpus.batches import (
    epoch_order,
    eval_windows,
    gather_windows,
    num_windows,
    split_stream,
    spread_windows,
)
from cllm_cli.corpus.dataset import dataset_header, load_dataset, prepare_dataset, stream_key
from cllm_cli.corpus.files import collect_files
from cllm_cli.corpus.instructions import (
    INSTRUCTIONS_FILE,
    Instructions,
    is_instruction_data,
    load_instructions,
    prepare_instructions,
    read_records,
    split_records,
)

__all__ = [
    "collect_files", "dataset_header", "load_dataset", "prepare_dataset", "stream_key",
    "epoch_order", "eval_windows", "gather_windows", "num_windows", "split_stream",
    "spread_windows", "INSTRUCTIONS_FILE", "Instructions", "is_instruction_data",
    "load_instructions", "prepare_instructions", "read_records", "split_records",
]
