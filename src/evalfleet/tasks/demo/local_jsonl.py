"""Load a demo task's JSONL data from next to its YAML, wherever the package is installed.

lm-eval hands ``dataset_kwargs`` to ``datasets.load_dataset`` as they are, so a relative
``data_files`` entry would resolve against the current directory; this ``custom_dataset``
hook resolves it against this folder instead and loads it with the same ``json`` builder.
"""

from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
