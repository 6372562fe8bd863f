"""Text data (`run.train.data.kind: text`): documents tokenized with the model's own tokenizer and
packed into sequences, addressed by global sample index like every source of engine/data.py.

Documents: `path` is a `.jsonl` file (one JSON object per line, the document in `text_field`), a
`.parquet` file (a `text_field` column; needs pyarrow), or a folder whose `*.jsonl` / `*.parquet`
files (searched recursively) are read in sorted path order. Blank lines are skipped.

Tokenizer: `transformers.AutoTokenizer` from a local folder (`tokenizer`; `open_data`'s
`tokenizer` argument when that is unset), never the network. Each document is tokenized without
special tokens and followed by the tokenizer's `eos_token_id`, so a sequence that packs two
documents shows where one ends.

Packing: the tokenized documents, in file order, form one stream of N tokens, cut exactly as a
token file (engine/data.py `TokenFileData`): `(N - 1) // seq_len` windows of `seq_len + 1`
tokens, window w starting at token w * seq_len; sample i belongs to epoch i // windows, and
within an epoch the windows are read in file order (`order: sequential`) or in a permutation
seeded with (seed, epoch) (`order: shuffle`). A sample is therefore a function of the documents,
the tokenizer, seq_len, seed and its global index alone: any rank count and any resume point
(`resume_sample`, which engine/train.py takes from the checkpoint's `samples_seen`) reads the same
token ids the uninterrupted run read at that index, mid-epoch included.

Cost: every rank reads and tokenizes all documents when the source opens (batched through the
fast tokenizer) and keeps the stream as int32 (4 bytes per token); for corpora too large for that,
tokenize once into a token file and use `kind: tokens`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dsl.engine.data import TokenBatches, WindowOrder
from dsl.engine.errors import UserError
from dsl.engine.train_config import DataConfig

__all__ = ["TextData", "read_documents", "document_files", "TOKENIZE_BATCH"]

TOKENIZE_BATCH = 1000
"""Documents handed to the tokenizer at once."""

_PATH_FIELD = "run.train.data.path"
_TOKENIZER_FIELD = "run.train.data.tokenizer"
_SUFFIXES = (".jsonl", ".parquet")


def document_files(path: Path) -> list[Path]:
    """The document files `path` names (itself, or the `*.jsonl` / `*.parquet` below a folder,
    sorted). Raises UserError naming run.train.data.path."""
    if not path.exists():
        raise UserError(f"{_PATH_FIELD}: no such file or folder: {path} (relative paths start at the ranks' "
                        f"working directory, {Path.cwd()})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise UserError(f"{_PATH_FIELD}: {path} holds no .jsonl or .parquet file")
        return files
    if path.suffix not in _SUFFIXES:
        raise UserError(f"{_PATH_FIELD}: {path}: kind: text reads .jsonl or .parquet files (one document per "
                        f"line or row, in the field run.train.data.text_field); got {path.suffix or 'no suffix'}")
    return [path]


def read_documents(files: list[Path], field: str) -> Iterator[str]:
    """Every document of `files`, in order. Raises UserError at the file (and line) of a record
    that is not JSON or has no string `field`."""
    for file in files:
        if file.suffix == ".parquet":
            yield from _parquet_documents(file, field)
            continue
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{file}:{number}:{err.colno} {_PATH_FIELD}: not a JSON object: {err.msg}") \
                        from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{file}:{number}:1 {_PATH_FIELD}: the record has no string field {field!r} "
                                    f"(run.train.data.text_field); keys: {sorted(record) if isinstance(record, dict) else type(record).__name__}")
                yield text


def _parquet_documents(file: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{_PATH_FIELD}: {file}: reading parquet needs pyarrow (pip install pyarrow), or give "
                        f"the documents as .jsonl") from None
    table = pq.ParquetFile(file)
    if field not in table.schema_arrow.names:
        raise UserError(f"{_PATH_FIELD}: {file} has no column {field!r} (run.train.data.text_field); columns: "
                        f"{table.schema_arrow.names}")
    for batch in table.iter_batches(columns=[field], batch_size=TOKENIZE_BATCH):
        for number, text in enumerate(batch.column(0).to_pylist()):
            if not isinstance(text, str):
                raise UserError(f"{_PATH_FIELD}: {file}: row value {number} of column {field!r} is {text!r}, "
                                f"not text")
            yield text


def load_tokenizer(folder: str | None) -> Any:
    """The fast tokenizer saved in `folder` (local files only). Raises UserError."""
    if folder is None:
        raise UserError(f"{_TOKENIZER_FIELD}: kind: text needs a tokenizer: give run.train.data.tokenizer (a "
                        f"folder holding tokenizer.json or the files transformers saves, usually the model's)")
    from dsl.engine.hf_model import _import_transformers

    transformers = _import_transformers()
    where = Path(folder).expanduser()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{_TOKENIZER_FIELD}: {where}: transformers cannot load a tokenizer from it: "
                        f"{str(err).splitlines()[0]}") from None


def tokenize(documents: Iterator[str], tokenizer: Any) -> np.ndarray:
    """[N] int32: every document's ids (no special tokens) followed by the eos id, concatenated."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"{_TOKENIZER_FIELD}: the tokenizer has no eos_token, which kind: text puts after every "
                        f"document so that a packed sequence shows where one ends; give one with an eos_token")
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray([*ids, eos], dtype=np.int32))
        batch.clear()

    for text in documents:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


class TextData(TokenBatches):
    """Packed windows of tokenized documents (see the module docstring).

    `tokenizer`: the folder of the model's tokenizer, used when `cfg.tokenizer` is unset.
    Raises UserError when the documents or the tokenizer cannot be read, the stream is shorter
    than one sequence, or a token id is >= vocab_size.
    """

    def __init__(self, cfg: DataConfig, *, vocab_size: int, tokenizer: str | None = None, **layout) -> None:
        super().__init__(**layout)
        if cfg.path is None:
            raise UserError(f"{_PATH_FIELD}: required with kind: text")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.path = Path(os.path.expanduser(cfg.path))
        files = document_files(self.path)
        self.tokenizer = load_tokenizer(cfg.tokenizer or tokenizer)
        self.tokens = tokenize(read_documents(files, cfg.text_field), self.tokenizer)
        """[n_tokens] int32: the packed stream."""
        self.n_tokens = len(self.tokens)
        if self.n_tokens < self.seq_len + 1:
            raise UserError(f"{_PATH_FIELD}: {self.path} tokenizes to {self.n_tokens:,} tokens; one sequence needs "
                            f"seq_len + 1 = {self.seq_len + 1}")
        top = int(self.tokens.max())
        if top >= vocab_size:
            raise UserError(f"{_TOKENIZER_FIELD}: the tokenizer gives token id {top}, but the model has "
                            f"{vocab_size} token ids (its vocab_size); is this the model's tokenizer?")
        self.windows = (self.n_tokens - 1) // self.seq_len
        """Sequences per epoch."""
        self.window = WindowOrder(self.cfg.order, self.cfg.seed, self.windows)
        """The window (0 <= w < windows) a global sample reads (engine/data.py)."""

    def sequences(self, start: int, count: int) -> torch.Tensor:
        t = self.seq_len
        firsts = [self.window(sample) * t for sample in range(start, start + count)]
        rows = [self.tokens[first : first + t + 1] for first in firsts]
        return torch.from_numpy(np.stack(rows).astype(np.int64))
