"""Text data (run.train.data.kind: text, engine/text_data.py): documents tokenized with a local
tokenizer the test builds (no network), packed, and resumable mid-epoch on the same token ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsl.engine.data import open_data
from dsl.engine.errors import UserError
from dsl.engine.train_config import DataConfig
from tests.hf_tiny import VOCAB, write_model

pytest.importorskip("transformers")

WORDS = 100
"""Word-level vocabulary: <eos> = 0, <unk> = 1, w0..w99 = 2..101 (fits the tiny models' 128)."""


def write_tokenizer(folder: Path) -> Path:
    """A word-level fast tokenizer saved as transformers saves one (tokenizer.json + config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(folder))
    return folder


def write_documents(path: Path, count: int, seed: int = 0) -> list[list[int]]:
    """`count` documents of 3-40 random words as jsonl; returns each one's expected ids (+ eos)."""
    rng = torch.Generator().manual_seed(seed)
    docs, lines = [], []
    for _ in range(count):
        n = int(torch.randint(3, 41, (1,), generator=rng))
        words = torch.randint(WORDS, (n,), generator=rng).tolist()
        lines.append(json.dumps({"id": len(lines), "text": " ".join(f"w{w}" for w in words)}))
        docs.append([w + 2 for w in words] + [0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is skipped
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[int]]:
    root = tmp_path_factory.mktemp("text")
    tok = write_tokenizer(root / "tok")
    first = write_documents(root / "docs" / "a.jsonl", 30, seed=1)
    second = write_documents(root / "docs" / "sub" / "b.jsonl", 30, seed=2)
    stream = [t for doc in first + second for t in doc]
    return root / "docs", tok, stream


def _text(corpus, *, order: str = "shuffle", seq_len: int = 16, **layout):
    docs, tok, _ = corpus
    cfg = DataConfig(kind="text", path=str(docs), tokenizer=str(tok), order=order, seed=7)
    return open_data(cfg, vocab_size=VOCAB, seq_len=seq_len, **layout)


def _global_batch(sources, step: int, grad_accum: int) -> list[list[int]]:
    """Every sequence of optimizer step `step` over all ranks, in the global sample order."""
    rows = []
    for micro in range(grad_accum):
        for source in sources:
            tokens, targets = source.batch(step, micro)
            rows += torch.cat([tokens, targets[:, -1:]], dim=1).tolist()
    return rows


def test_documents_are_packed_in_file_order_with_eos_between_them(corpus) -> None:
    data = _text(corpus, order="sequential", micro_batch=3)
    stream = corpus[2]
    assert data.tokens.tolist() == stream  # a.jsonl, then sub/b.jsonl (sorted paths), each doc + eos
    assert data.windows == (len(stream) - 1) // 16
    tokens, targets = data.batch(2)  # samples 3, 4, 5: windows starting at 48, 64, 80
    for row, window in enumerate((3, 4, 5)):
        assert tokens[row].tolist() == stream[window * 16 : window * 16 + 16]
        assert targets[row].tolist() == stream[window * 16 + 1 : window * 16 + 17]


def test_resuming_mid_epoch_reads_the_token_ids_the_uninterrupted_run_read(corpus) -> None:
    """2 ranks x micro 2 x grad_accum 2 (8 sequences a step) for 12 steps crosses epochs (about 70
    windows); a run resumed after step 5 (mid-epoch) on 2 ranks, and one resumed on 1 rank with
    grad_accum 4, read exactly the same sequences at steps 6-12."""
    steps, saved_at = 12, 5
    uninterrupted = [_text(corpus, micro_batch=2, grad_accum=2, dp_size=2, rank=r) for r in range(2)]
    assert steps * 8 > uninterrupted[0].windows  # the run wraps into a second epoch
    assert saved_at * 8 % uninterrupted[0].windows  # the save is mid-epoch
    expected = {s: _global_batch(uninterrupted, s, 2) for s in range(1, steps + 1)}
    samples_seen = uninterrupted[0].samples_seen(saved_at)  # what the checkpoint records

    same = [_text(corpus, micro_batch=2, grad_accum=2, dp_size=2, rank=r, resume_step=saved_at,
                  resume_sample=samples_seen) for r in range(2)]
    other = [_text(corpus, micro_batch=2, grad_accum=4, dp_size=1, resume_step=saved_at,
                   resume_sample=samples_seen)]
    for step in range(saved_at + 1, steps + 1):
        assert _global_batch(same, step, 2) == expected[step], step
        assert _global_batch(other, step, 4) == expected[step], step
    # Not a constant: the steps differ, and each epoch draws its own order.
    assert expected[6] != expected[7]
    assert [_text(corpus, micro_batch=1).window(i) for i in range(5)] != list(range(5))


def test_seed_changes_the_order_and_ranks_read_different_samples(corpus) -> None:
    docs, tok, _ = corpus
    a = _text(corpus, micro_batch=2, dp_size=2, rank=0)
    b = _text(corpus, micro_batch=2, dp_size=2, rank=1)
    assert not torch.equal(a.batch(1)[0], b.batch(1)[0])
    other_seed = open_data(DataConfig(kind="text", path=str(docs), tokenizer=str(tok), seed=8), vocab_size=VOCAB,
                           seq_len=16, micro_batch=2, dp_size=2)
    assert not torch.equal(a.batch(1)[0], other_seed.batch(1)[0])


def test_the_tokenizer_of_the_model_folder_is_used_when_data_names_none(corpus, tmp_path: Path) -> None:
    docs, tok, stream = corpus
    model = write_tokenizer(write_model(tmp_path / "m", "llama"))
    data = open_data(DataConfig(kind="text", path=str(docs)), vocab_size=VOCAB, tokenizer=str(model),
                     seq_len=16, micro_batch=1)
    assert data.tokens.tolist() == stream


def test_unreadable_documents_and_unfit_tokenizers_are_located(corpus, tmp_path: Path) -> None:
    _, tok, _ = corpus
    bad = tmp_path / "bad.jsonl"

    def opened(path: Path, vocab: int = VOCAB, field: str = "text", tokenizer: str | None = str(tok)):
        return open_data(DataConfig(kind="text", path=str(path), text_field=field),
                         vocab_size=vocab, tokenizer=tokenizer, seq_len=16, micro_batch=1)

    bad.write_text('{"text": "w1 w2"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=rf"{bad}:2:10 run.train.data.path: not a JSON object"):
        opened(bad)
    bad.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    with pytest.raises(UserError, match=rf"{bad}:2:1 run.train.data.path: the record has no string field 'text'"):
        opened(bad)
    bad.write_text('{"body": "w1 w2"}\n')
    with pytest.raises(UserError, match=r"tokenizes to 3 tokens; one sequence needs seq_len \+ 1 = 17"):
        opened(bad, field="body")
    write_documents(bad, 10)
    with pytest.raises(UserError, match=r"run.train.data.tokenizer: the tokenizer gives token id \d+, but the "
                                        r"model has 50 token ids"):
        opened(bad, vocab=50)
    with pytest.raises(UserError, match=r"run.train.data.tokenizer: kind: text needs a tokenizer"):
        opened(bad, tokenizer=None)
    with pytest.raises(UserError, match=rf"run.train.data.tokenizer: {tmp_path}: transformers cannot load"):
        opened(bad, tokenizer=str(tmp_path))
    (tmp_path / "notes.txt").write_text("w1")
    with pytest.raises(UserError, match=r"kind: text reads .jsonl or .parquet files"):
        opened(tmp_path / "notes.txt")
    with pytest.raises(UserError, match=r"run.train.data.path: no such file or folder"):
        opened(tmp_path / "missing.jsonl")


def test_text_without_a_tokenizer_is_a_located_spec_error(tmp_path: Path) -> None:
    from dsl.engine.train import load_run_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("run:\n  train:\n    data: {kind: text, path: docs.jsonl}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    with pytest.raises(UserError, match=r"spec.yaml:3:\d+ run.train: data.kind: text tokenizes the documents with "
                                        r"the model's tokenizer: set data.tokenizer"):
        load_run_spec(spec)
    write_model(tmp_path / "m", "llama")  # a Hugging Face folder is the default tokenizer: no error
    spec.write_text("run:\n  train:\n    model: {hf: m}\n    data: {kind: text, path: docs.jsonl}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    assert load_run_spec(spec).train.data.tokenizer is None
    spec.write_text("run:\n  train:\n    data: {kind: tokens, path: t.bin, tokenizer: tok}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    with pytest.raises(UserError, match=r"spec.yaml:3:\d+ run.train.data: tokenizer \('tok'\) is read only with "
                                        r"kind: text"):
        load_run_spec(spec)
    spec.write_text("run:\n  train:\n    data: {kind: tokens, path: t.bin, text_field: body}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    with pytest.raises(UserError, match=r"run.train.data: text_field \('body'\) is read only with kind: text"):
        load_run_spec(spec)


def test_a_run_resumed_mid_epoch_trains_on_the_same_text_as_the_uninterrupted_run(corpus, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """The trainer end to end on a Hugging Face model: 6 steps straight, or 3 steps, a checkpoint,
    and a second launch that resumes; fp32 on the same rank count, so the losses of steps 4-6
    are bit-identical only if the resumed run read the same token ids."""
    from dsl.engine.train import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    docs, tok, _ = corpus
    write_model(tmp_path / "m", "llama")
    for f in Path(tok).iterdir():  # the model folder holds its tokenizer: data.tokenizer defaults to it
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, tmp_path / "m" / f.name)

    def run(out: str, steps: int, every: str = "") -> list[float]:
        spec = tmp_path / f"{out}-{steps}.yaml"
        spec.write_text(f"run:\n  train:\n    model: {{hf: m, seq_len: 16}}\n    steps: {steps}\n    log_every: 1\n"
                        f"    data: {{kind: text, path: {docs}}}\n{every}"
                        f"engine: {{micro_batch: 4, optimizer: {{lr: 0.01}}, scheduler: {{type: constant, "
                        f"warmup_steps: 0}}}}\noutput_dir: {tmp_path / out}\n")
        assert main([str(spec)]) == 0
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows]

    straight = run("straight", 6)
    run("resumed", 3, every="    checkpoint_every: 3\n")
    resumed = run("resumed", 6)  # appends steps 4-6 to the same metrics.jsonl
    assert len(straight) == len(resumed) == 6
    assert resumed == straight
