"""Data of the chain tasks: the jsonl files beside this module, found relative to it (not the working directory).

lm-eval imports this file by path (`!function utils.in_distribution`), so it needs only the standard library and
`datasets`. The files are written by `modeling_recurrent.evaluate.write_chain_task_data`.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    lines = (HERE / f"{name}.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})


def in_distribution(**kwargs) -> datasets.DatasetDict:
    """Fresh problems of the training distribution (0-6 hops). kwargs: lm-eval metadata, unused."""
    return _load("in_distribution")


def harder(**kwargs) -> datasets.DatasetDict:
    """Longer chains than any seen in training (7-10 hops). kwargs: lm-eval metadata, unused."""
    return _load("harder")
