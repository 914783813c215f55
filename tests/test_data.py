from collections import Counter
from pathlib import Path

import pytest
import torch
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer

from lit_dar.data import (
    BOS_TOKEN,
    EOS_TOKEN,
    StdlibCorpus,
    cached_tokens,
    encode_documents,
    ensure_tokenizer,
    is_validation,
    list_stdlib_files,
    load_corpus,
    split_corpus,
    stdlib_dir,
    train_tokenizer,
)

MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train, _ = split_corpus(load_corpus(MAX_BYTES), val_fraction=0.2)
    train_tokenizer((d.text for d in train), vocab_size=512, out_dir=out)
    return out


def test_corpus_is_found_capped_and_deterministic():
    names = list_stdlib_files()
    assert len(names) > 100
    assert names == list_stdlib_files()
    assert "os.py" in names and "pydoc_data/topics.py" in names
    assert not any(part in ("test", "tests", "idlelib", "site-packages") for n in names for part in n.split("/"))

    docs = load_corpus(MAX_BYTES)
    assert sum(len(d.text.encode()) for d in docs) <= MAX_BYTES
    assert docs == load_corpus(MAX_BYTES)
    assert [d.name for d in docs] == names[: len(docs)]
    assert docs[0].text == (stdlib_dir() / docs[0].name).read_text(encoding="utf-8")
    # a smaller cap gives a prefix of a larger one
    small = load_corpus(MAX_BYTES // 4)
    assert 0 < len(small) < len(docs) and docs[: len(small)] == small
    with pytest.raises(ValueError, match="raise max_bytes"):
        load_corpus(max_bytes=10)


def test_split_is_disjoint_and_fixed():
    docs = load_corpus(MAX_BYTES)
    train, val = split_corpus(docs, val_fraction=0.2)
    train_names, val_names = {d.name for d in train}, {d.name for d in val}
    assert train_names.isdisjoint(val_names)
    assert train_names | val_names == {d.name for d in docs}
    # the split depends on the file name only: pinned values guard against accidental changes
    assert is_validation("_py_abc.py", 0.05) and is_validation("signal.py", 0.05)
    assert not is_validation("os.py", 0.05) and not is_validation("pydoc_data/topics.py", 0.05)
    # a document keeps its split whatever the cap
    big_train, _ = split_corpus(load_corpus(2 * MAX_BYTES), val_fraction=0.2)
    assert train_names <= {d.name for d in big_train}
    with pytest.raises(ValueError, match="validation documents"):
        split_corpus(docs[:1], val_fraction=0.2)


def test_tokenizer_trains_saves_and_loads_in_litgpt(tokenizer_dir):
    assert (tokenizer_dir / "tokenizer.json").is_file() and (tokenizer_dir / "tokenizer_config.json").is_file()
    tok = Tokenizer(tokenizer_dir)
    assert tok.backend == "huggingface"
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN) == 0
    assert tok.bos_id == tok.token_to_id(BOS_TOKEN) == 1
    assert tok.use_bos and tok.vocab_size == 512
    text = "def f(x):\n    return {'ünïcode': x ** 2}  # 🙂\n\tdone"
    ids = tok.encode(text)
    assert ids[0].item() == tok.bos_id and ids.dtype == torch.int32
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=False, eos=True)) == text


def test_ensure_tokenizer_trains_once(tmp_path):
    out = tmp_path / "tok"
    tok = ensure_tokenizer(out, vocab_size=300, max_bytes=200_000)
    assert tok.vocab_size == 300
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    again = ensure_tokenizer(out, vocab_size=999, max_bytes=200_000)
    assert again.vocab_size == 300 and (out / "tokenizer.json").stat().st_mtime_ns == mtime


def _module(tokenizer_dir, cache_dir, seed=42, batch_size=4, max_seq_length=32) -> StdlibCorpus:
    data = StdlibCorpus(cache_dir=cache_dir, max_bytes=MAX_BYTES, val_fraction=0.2, seed=seed)
    data.connect(Tokenizer(tokenizer_dir), batch_size=batch_size, max_seq_length=max_seq_length)
    data.prepare_data()
    data.setup()
    return data


def test_datamodule_batches(tokenizer_dir, tmp_path):
    data = _module(tokenizer_dir, tmp_path)
    assert isinstance(data, DataModule)
    train = list(data.train_dataloader())
    assert len(train) == len(data.train_dataset) // 4
    assert all(b.shape == (4, 33) and b.dtype == torch.int64 for b in train)
    val = list(data.val_dataloader())
    assert sum(len(b) for b in val) == len(data.val_dataset) and val[0].shape == (4, 33)

    # windows are consecutive slices of the tokenized train documents
    docs, _ = split_corpus(load_corpus(MAX_BYTES), val_fraction=0.2)
    stream = encode_documents(docs, data.tokenizer)
    assert stream[0].item() == data.tokenizer.bos_id
    assert torch.equal(data.train_dataset[0], stream[:33].long())
    assert torch.equal(data.train_dataset[2], stream[66:99].long())
    # every train window is used exactly once per epoch (shuffled), val is in order
    seen = Counter(map(tuple, torch.cat(train).tolist()))
    every = Counter(tuple(data.train_dataset[i].tolist()) for i in range(len(data.train_dataset)))
    assert seen.total() == len(train) * 4 > len(data.train_dataset) - 4 and seen <= every
    assert torch.equal(val[0][1], data.val_dataset[1])

    # same seed -> same order, also from a fresh module; another seed -> another order
    again = _module(tokenizer_dir, tmp_path)
    assert torch.equal(next(iter(again.train_dataloader())), train[0])
    assert torch.equal(next(iter(data.train_dataloader())), train[0])
    other = _module(tokenizer_dir, tmp_path, seed=7)
    assert not torch.equal(next(iter(other.train_dataloader())), train[0])


def test_train_loader_reshuffles_and_resumes(tokenizer_dir, tmp_path):
    data = _module(tokenizer_dir, tmp_path, batch_size=8, max_seq_length=64)
    loader = data.train_dataloader()
    epoch0 = list(loader)
    epoch1 = list(loader)
    assert len(epoch0) == len(epoch1) == len(loader) and not torch.equal(epoch0[0], epoch1[0])
    assert loader.state_dict() == {"epoch": 2, "batches": 0}

    # stop mid-epoch, save, and resume in a fresh module: the rest of the sequence is unchanged
    loader = data.train_dataloader()
    iterator = iter(loader)
    seen = [next(iterator) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(seen, epoch0))
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = _module(tokenizer_dir, tmp_path, batch_size=8, max_seq_length=64).train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    expected = epoch0[3:] + epoch1
    assert len(rest) == len(expected) and all(torch.equal(a, b) for a, b in zip(rest, expected))

    # Fabric checkpoints hold only the loader's position, not a pickled loader and dataset
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped = fabric.setup_dataloaders(data.train_dataloader())
    next(iter(wrapped))
    fabric.save(tmp_path / "ckpt.pth", {"train_dataloader": wrapped})
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert saved["train_dataloader"] == {"epoch": 0, "batches": 1}
    assert (tmp_path / "ckpt.pth").stat().st_size < 10_000


def test_cache_is_reused(tokenizer_dir, tmp_path):
    _module(tokenizer_dir, tmp_path)
    files = sorted(tmp_path.glob("*.pt"))
    assert [f.name.split("-")[0] for f in files] == ["train", "val"]
    mtimes = [f.stat().st_mtime_ns for f in files]

    # overwrite the train cache with a marker stream: a reused cache must serve it verbatim
    marker = torch.arange(10 * 33, dtype=torch.int32) % 7
    torch.save({"tokens": marker, "documents": []}, files[0])
    data = _module(tokenizer_dir, tmp_path, batch_size=2)
    assert sorted(tmp_path.glob("*.pt")) == files and files[1].stat().st_mtime_ns == mtimes[1]
    assert len(data.train_dataset) == 10 and torch.equal(data.train_dataset[1], marker[33:66].long())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # a different tokenizer gets its own cache entry
    docs = load_corpus(MAX_BYTES)[:3]
    _, path_a = cached_tokens(docs, Tokenizer(tokenizer_dir), tmp_path / "other", "train")
    other_tok = train_tokenizer((d.text for d in docs), 300, tmp_path / "tok300")
    _, path_b = cached_tokens(docs, other_tok, tmp_path / "other", "train")
    assert path_a != path_b and path_a.is_file() and path_b.is_file()


def test_datamodule_errors(tokenizer_dir, tmp_path):
    data = StdlibCorpus(cache_dir=tmp_path, max_bytes=MAX_BYTES)
    data.connect(None, batch_size=2, max_seq_length=16)
    with pytest.raises(ValueError, match="ensure_tokenizer"):
        data.prepare_data()
    data = StdlibCorpus(cache_dir=tmp_path, max_bytes=MAX_BYTES, val_fraction=0.2)
    data.connect(Tokenizer(tokenizer_dir), batch_size=10**6, max_seq_length=16)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data.setup()


def test_instantiates_from_yaml_class_path(tmp_path):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--data", type=DataModule | None, default=None)
    config = tmp_path / "config.yaml"
    config.write_text(
        "data:\n"
        "  class_path: lit_dar.data.StdlibCorpus\n"
        "  init_args:\n"
        f"    cache_dir: {tmp_path / 'cache'}\n"
        "    max_bytes: 123456\n"
        "    seed: 3\n"
    )
    cfg = parser.parse_args(["--config", str(config)])
    data = parser.instantiate_classes(cfg).data
    assert isinstance(data, StdlibCorpus)
    assert (data.max_bytes, data.seed, data.cache_dir) == (123456, 3, tmp_path / "cache")
    assert data.val_fraction == 0.05 and data.tokenizer is None
