"""An offline pretraining corpus, a tokenizer trainer and a LitGPT data module.

Every machine that runs Python already has a few MB of real, varied text: the standard
library's own sources (code, docstrings, comments, and the pydoc topics in
``pydoc_data/topics.py``). Using it as the default corpus means a smoke-test or ablation
run needs no download, and the same Python version yields the same tokens everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset

from lit_dar.sampling import ResumableDataLoader

DEFAULT_MAX_BYTES = 4_000_000
"""About 1M tokens with an 8k vocab: enough text for the tiny default, quick to tokenize."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Directories that are not representative source text (tests, vendored packages, the IDLE
# app, generated codec tables) or not part of the stdlib proper.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings", "lib-dynload"}
)
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Document:
    """One corpus file: ``name`` is its POSIX path relative to the stdlib root."""

    name: str
    text: str


def stdlib_dir() -> Path:
    """The running interpreter's standard library (the base install's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def list_stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the corpus files, in a fixed pseudo-random order.

    Ordering by a hash of the path (not alphabetically) makes any ``max_bytes`` prefix a
    representative sample of the whole library instead of just ``asyncio/`` and friends,
    and a file's position does not depend on which other files exist.
    """
    root = stdlib_dir() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Corpus root {str(root)!r} is not a directory.")
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for filename in filenames:
            if filename.endswith(".py"):
                names.append((Path(dirpath) / filename).relative_to(root).as_posix())
    return sorted(names, key=lambda name: (_digest("order", name), name))


def load_corpus(max_bytes: int | None = DEFAULT_MAX_BYTES, root: Path | None = None) -> list[Document]:
    """Read corpus files in `list_stdlib_files` order until the next one would exceed ``max_bytes``.

    Stopping at the first file that does not fit (rather than skipping it) makes the corpus
    for a smaller cap a prefix of the corpus for a larger one. Files that are not UTF-8 are
    skipped. ``max_bytes=None`` reads everything.
    """
    root = stdlib_dir() if root is None else Path(root)
    docs: list[Document] = []
    total = 0
    names = list_stdlib_files(root)
    if not names:
        raise ValueError(f"No corpus files (*.py) under {str(root)!r}: point data.root at a directory of Python sources.")
    for name in names:
        try:
            text = (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            break
        docs.append(Document(name, text))
        total += size
    if not docs:
        raise ValueError(f"No corpus files under {str(root)!r} fit in max_bytes={max_bytes}; raise max_bytes.")
    return docs


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split.

    Decided by a hash of the file's name alone, so a file lands in the same split on every
    machine, for every ``max_bytes`` that includes it, whatever other files exist.
    """
    return int(_digest("split", name)[:8], 16) / 2**32 < val_fraction


def split_corpus(docs: Sequence[Document], val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """Split documents into ``(train, val)`` with `is_validation`; both must be non-empty."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if not train or not val:
        raise ValueError(
            f"The split of {len(docs)} documents has {len(train)} train and {len(val)} validation documents;"
            " raise max_bytes or change val_fraction."
        )
    return train, val


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path | str, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer, save it to ``out_dir`` and load it back with LitGPT.

    Writes ``tokenizer.json`` and a ``tokenizer_config.json`` that LitGPT's `Tokenizer` reads
    for its special tokens. Byte-level means no unknown tokens: any string round-trips.
    ``vocab_size`` counts the two special tokens, which get ids 0 (``<|endoftext|>``, eos)
    and 1 (``<|startoftext|>``, bos). ``add_bos_token`` is true so ``Tokenizer.encode`` prepends
    bos by default, like the documents seen in pretraining (`encode_documents`).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 2} (256 bytes + 2 special tokens).")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        # LitGPT's Tokenizer indexes `tokenizer_class` unconditionally when this file exists.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Tokenizer(out_dir)


def ensure_tokenizer(
    out_dir: Path | str,
    vocab_size: int = 8192,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    val_fraction: float = 0.05,
    root: Path | None = None,
) -> Tokenizer:
    """Load the tokenizer in ``out_dir``, training one on the corpus' train split if none exists.

    Lets a pretraining run without a ``tokenizer_dir`` make its own and then pass ``out_dir`` on
    as the tokenizer dir, so checkpoints carry the tokenizer files.
    """
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").is_file() or (out_dir / "tokenizer.model").is_file():
        return Tokenizer(out_dir)
    train = [d for d in load_corpus(max_bytes, root) if not is_validation(d.name, val_fraction)]
    if not train:
        raise ValueError(f"No training documents fit in max_bytes={max_bytes}; raise max_bytes.")
    return train_tokenizer((d.text for d in train), vocab_size, out_dir)


def encode_documents(docs: Iterable[Document], tokenizer: Tokenizer) -> torch.Tensor:
    """Concatenate the token ids of all documents into one 1-D int32 tensor.

    Like LitGPT's ``TextFiles``, each stripped document starts with bos. Tokenizers without a
    bos token (e.g. Qwen's) end each document with eos instead, so documents stay delimited.
    """
    use_bos = tokenizer.bos_id is not None
    use_eos = not use_bos and tokenizer.eos_id is not None
    chunks = [tokenizer.encode(d.text.strip(), bos=use_bos, eos=use_eos).to(torch.int32) for d in docs]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int32)


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    if tokenizer.backend == "huggingface":
        blob = tokenizer.processor.to_str()
    else:
        blob = tokenizer.processor.serialized_model_proto().hex()
    return _digest(blob, str(tokenizer.bos_id), str(tokenizer.eos_id))


def _corpus_fingerprint(docs: Iterable[Document]) -> str:
    return _digest(*(f"{d.name}:{_digest(d.text)}" for d in docs))


def cached_tokens(docs: Sequence[Document], tokenizer: Tokenizer, cache_dir: Path, split: str) -> tuple[torch.Tensor, Path]:
    """`encode_documents`, memoized in ``cache_dir`` under a key of tokenizer and document contents.

    The file is written to a temporary name and renamed, so concurrent ranks or an interrupted
    run never leave a half-written cache behind. Returns the tokens and the cache file path.
    """
    key = _digest(str(_CACHE_VERSION), split, _tokenizer_fingerprint(tokenizer), _corpus_fingerprint(docs))
    path = Path(cache_dir) / f"{split}-{key[:24]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)["tokens"], path
    tokens = encode_documents(docs, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"tokens": tokens, "documents": [d.name for d in docs]}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tokens, path


class TokenWindows(Dataset):
    """Non-overlapping windows of ``block_size`` tokens from one long token stream (remainder dropped)."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.block_size
        return self.tokens[start : start + self.block_size].to(torch.int64)


@dataclass
class StdlibCorpus(DataModule):
    """Pretraining data from the Python standard library's sources; works fully offline.

    Batches follow LitGPT's pretraining convention (``TinyStories``, ``TextFiles``): each batch
    is a ``(batch_size, max_seq_length + 1)`` int64 tensor of consecutive tokens, and the
    training loop takes ``batch[:, :-1]`` as input and ``batch[:, 1:]`` as targets. Documents
    are concatenated (each starting with bos) and cut into non-overlapping windows. The train
    loader (`ResumableDataLoader`) reshuffles each epoch from ``seed``, shards windows across
    distributed ranks, drops the last partial batch and checkpoints its position; the
    validation loader keeps a fixed order and every window.
    """

    cache_dir: Path = Path("data/stdlib")
    """Where the tokenized splits are cached, keyed by tokenizer and corpus contents."""
    max_bytes: int | None = DEFAULT_MAX_BYTES
    """Cap on the corpus size in bytes of UTF-8 text (None: the whole standard library, ~11 MB)."""
    val_fraction: float = 0.05
    """Approximate fraction of documents that go to the validation split."""
    seed: int = 42
    """The seed for shuffling the training windows."""
    num_workers: int = 0
    """Data loader workers. Windows are slices of an in-memory tensor, so 0 is usually fastest."""
    root: Path | None = None
    """Corpus root directory; None means the running Python's standard library."""

    tokenizer: Tokenizer | None = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    max_seq_length: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        self.cache_dir = Path(self.cache_dir)
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    def connect(self, tokenizer: Tokenizer | None = None, batch_size: int = 1, max_seq_length: int = -1) -> None:
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length

    def _splits(self) -> dict[str, list[Document]]:
        if self.tokenizer is None:
            raise ValueError(
                "StdlibCorpus needs a tokenizer: pass `--tokenizer_dir`, or create one with"
                " `lit_dar.data.ensure_tokenizer(out_dir)` and pass that directory."
            )
        train, val = split_corpus(load_corpus(self.max_bytes, self.root), self.val_fraction)
        return {"train": train, "val": val}

    def prepare_data(self) -> None:
        for split, docs in self._splits().items():
            cached_tokens(docs, self.tokenizer, self.cache_dir, split)

    def setup(self, stage: str = "") -> None:
        if self.max_seq_length < 1:
            raise ValueError("Call `connect(tokenizer, batch_size, max_seq_length)` with max_seq_length >= 1 first.")
        block_size = self.max_seq_length + 1  # the extra token is the last target
        datasets = {}
        for split, docs in self._splits().items():
            tokens, _ = cached_tokens(docs, self.tokenizer, self.cache_dir, split)
            datasets[split] = TokenWindows(tokens, block_size)
            if len(datasets[split]) == 0:
                raise ValueError(
                    f"The {split} split has {len(tokens)} tokens, fewer than one window of {block_size};"
                    " raise max_bytes or lower max_seq_length."
                )
        if len(datasets["train"]) < self.batch_size:
            raise ValueError(
                f"The train split has {len(datasets['train'])} windows, fewer than batch_size={self.batch_size};"
                " raise max_bytes or lower batch_size/max_seq_length."
            )
        self.train_dataset, self.val_dataset = datasets["train"], datasets["val"]

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_dataset is None:
            self.setup()
        return ResumableDataLoader(self.train_dataset, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup()
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
