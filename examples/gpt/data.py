"""Data for the default GPT job: corpus -> byte-level BPE -> uint16 token files, cached.

    prepared = prepare_data(None, "~/.cache/trainsup/gpt", vocab_size=8192,
                            val_fraction=0.1, max_corpus_bytes=4_000_000)
    train_ds = TokenBlockDataset(prepared.train_path, block_size=256)

`corpus=None` means the CPython standard library sources (`*.py` under
`sysconfig.get_paths()["stdlib"]`, without site-packages/dist-packages and without the
test suite's data folders): a corpus that exists wherever Python does.

Cache layout (one folder per key, published by an atomic rename, so a folder that exists
is complete; a kill mid-prepare leaves only a `.tmp-*` folder that the next run deletes):

    CACHE_DIR/
      <key>.lock                   filelock: one process prepares a key, the others wait
      <key>/                       key = sha256(format, corpus fingerprint, tokenizer
        train.bin  val.bin                     settings, val_fraction, max_corpus_bytes)
        tokenizer.json
        meta.json                  written last; vocab_size, token counts, fingerprint ...
      .tmp-<key>-<pid>-<rand>/     a prepare in progress (or killed)

Every rank may call `prepare_data`: the first to take the lock prepares, the others block
on the lock and then read the finished cache.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

# Bump when the on-disk layout or the preparation recipe changes: old caches are ignored.
FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
# Token ids are stored as uint16, so ids 0..65535 fit: at most 65536 distinct tokens.
MAX_UINT16_VOCAB = 65536
# 256 byte tokens + the end-of-text token: the smallest vocabulary a byte-level BPE has.
MIN_VOCAB = 257
# Text is encoded in chunks of about this many characters: encode_batch parallelises
# over chunks, and one giant file would otherwise be a single slow item.
ENCODE_CHUNK_CHARS = 4096
# How many characters go to encode_batch at once (bounds the memory of Encoding objects).
ENCODE_BATCH_CHARS = 2_000_000
# A file is text when its first bytes hold no NUL and decode as UTF-8.
SNIFF_BYTES = 8192
# Folders skipped when the default corpus (the stdlib) is collected.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Cutting a chunk just before a "\n" that follows a non-space character gives the same
# tokens as encoding the whole text: in the byte-level pre-tokenizer's regex no pre-token
# holds both a non-space character and the whitespace after it, and matching resumes at
# the cut exactly as it does in the whole text (the regex has no look-behind).
_SAFE_CUT = re.compile(r"(?<=\S)\n")


class DataError(ValueError):
    """Bad corpus or data settings; the message names the problem and the fix."""


# --------------------------------------------------------------------------- corpus


def default_corpus_root() -> Path:
    """The CPython standard library sources of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_stdlib_test_data(rel_parts: Sequence[str]) -> bool:
    """True for files under a test folder's data folders (test/tokenizedata, ...).

    Those hold deliberately broken, non-UTF-8 or generated sources, not code."""
    in_tests = False
    for part in rel_parts[:-1]:
        if part in ("test", "tests"):
            in_tests = True
        elif in_tests and ("data" in part or part == "encoded_modules"):
            return True
    return False


def _sniff_text(path: Path) -> bool:
    """True when the file's first bytes look like UTF-8 text (no NUL, valid UTF-8)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        # final=False: a multi-byte character cut at the end of the sniff is fine.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _walk_files(root: Path, skip_dirs: frozenset[str] = frozenset({"__pycache__"})) -> Iterable[Path]:
    # os.walk does not follow symlinked folders (no loops); hidden entries are skipped,
    # skipped folders are pruned before descending (site-packages can be huge).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def collect_corpus(
    path_or_default: str | os.PathLike | None = None,
    *,
    suffixes: Sequence[str] | None = None,
) -> list[Path]:
    """Text files of a corpus, sorted by path (a deterministic order).

    `path_or_default`: a text file, a folder (searched recursively, hidden entries and
    __pycache__ skipped), or None for the Python standard library (`*.py` only). A file
    counts as text when its first 8 KiB hold no NUL byte and decode as UTF-8. `suffixes`
    (e.g. (".py", ".md")) restricts a folder to those file name endings. Empty files are
    left out. Raises DataError when the path does not exist, the folder holds no text
    files, or every text file is empty.
    """
    if path_or_default is None:
        root = default_corpus_root()
        if not root.is_dir():
            raise DataError(
                f"default corpus: the Python standard library folder {root} does not exist; "
                "name a corpus file or folder in the job instead"
            )
        files = []
        for p in _walk_files(root, _STDLIB_SKIP_DIRS):
            if p.suffix != ".py" or _is_stdlib_test_data(p.relative_to(root).parts):
                continue
            files.append(p)
        return _keep_text_files(sorted(files), root)

    root = Path(path_or_default).expanduser().absolute()
    if not root.exists():
        raise DataError(
            f"corpus path {root} does not exist; pass an existing text file or folder "
            "(or no corpus for the Python standard library)"
        )
    if root.is_file():
        if not _sniff_text(root):
            raise DataError(
                f"corpus file {root} is not UTF-8 text (binary or another encoding); "
                "convert it to UTF-8 or name a text file"
            )
        if root.stat().st_size == 0:
            raise DataError(f"corpus file {root} is empty; name a file that holds text")
        return [root]
    if not root.is_dir():
        raise DataError(f"corpus path {root} is neither a file nor a folder; name a text file or folder")
    wanted = tuple(suffixes) if suffixes else None
    files = sorted(p for p in _walk_files(root) if wanted is None or p.name.endswith(wanted))
    return _keep_text_files(files, root)


def _keep_text_files(candidates: list[Path], root: Path) -> list[Path]:
    text_files, empty = [], 0
    for p in candidates:
        try:
            size = p.stat().st_size
        except OSError:  # a dangling symlink, a file deleted meanwhile
            continue
        if size == 0:
            empty += 1
        elif _sniff_text(p):
            text_files.append(p)
    if not text_files:
        if empty:
            raise DataError(
                f"corpus folder {root}: all {empty} text files are empty; "
                "add text to them or name another corpus"
            )
        raise DataError(
            f"corpus folder {root} holds no text files (UTF-8, no NUL bytes; "
            f"{len(candidates)} other files seen); name a folder of text files"
        )
    return text_files


def corpus_fingerprint(files: Sequence[Path]) -> str:
    """sha256 of (absolute path, size, mtime_ns) of every file: cheap, no file is read."""
    h = hashlib.sha256()
    for p in files:
        st = os.stat(p)
        h.update(f"{Path(p).absolute()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenizer


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise DataError(f"vocab_size must be an int, got {vocab_size!r}; use e.g. 8192")
    if vocab_size > MAX_UINT16_VOCAB:
        raise DataError(
            f"vocab_size={vocab_size} does not fit uint16 token files (ids 0..65535); "
            f"use vocab_size <= {MAX_UINT16_VOCAB}"
        )
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab_size={vocab_size} is below the {MIN_VOCAB} tokens a byte-level BPE needs "
            f"(256 bytes + {EOT_TOKEN}); use vocab_size >= {MIN_VOCAB}"
        )


def _tokenizer_settings(vocab_size: int) -> dict:
    import tokenizers

    return {
        "kind": "byte-level-bpe",
        "vocab_size": vocab_size,
        "special_tokens": [EOT_TOKEN],
        "add_prefix_space": False,
        "min_frequency": 0,
        # A new tokenizers release may train differently: its caches are not reused.
        "tokenizers_version": tokenizers.__version__,
    }


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, corpus_label: str = "corpus"):
    """Train a byte-level BPE (`<|endoftext|>` has id 0). DataError when the corpus is
    too small to yield `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    achieved = tok.get_vocab_size()
    if achieved < vocab_size:
        n_chars = sum(len(t) for t in texts)
        raise DataError(
            f"the tokenizer reached only {achieved} tokens on {corpus_label} "
            f"({n_chars} characters), fewer than vocab_size={vocab_size}; "
            f"lower vocab_size to <= {achieved} or use a larger corpus"
        )
    return tok


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved by prepare_data (`PreparedData.tokenizer_path`)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _chunks(text: str, chunk_chars: int) -> Iterable[str]:
    start, n = 0, len(text)
    while n - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


def encode_texts(tokenizer, texts: Sequence[str], *, chunk_chars: int = ENCODE_CHUNK_CHARS) -> np.ndarray:
    """Token ids of the texts as one uint16 array, `<|endoftext|>` after each text.

    Same ids as encoding every text whole; done with encode_batch over chunks of about
    `chunk_chars` characters, cut only where no pre-token can span the cut."""
    eot = tokenizer.token_to_id(EOT_TOKEN)
    if eot is None:
        raise DataError(f"the tokenizer has no {EOT_TOKEN} token; train it with train_tokenizer()")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    parts: list[np.ndarray] = []
    batch: list[str] = []
    # ends[i] = True when batch[i] is the last chunk of its text (EOT goes after it).
    ends: list[bool] = []
    batch_chars = 0

    def flush() -> None:
        nonlocal batch_chars
        if not batch:
            return
        encs = encode(batch, add_special_tokens=False)
        ids: list[int] = []
        for enc, end in zip(encs, ends):
            ids.extend(enc.ids)
            if end:
                ids.append(eot)
        arr = np.array(ids, dtype=np.int64)
        if arr.size and int(arr.max()) >= MAX_UINT16_VOCAB:
            raise DataError(
                f"token id {int(arr.max())} does not fit uint16; "
                f"use vocab_size <= {MAX_UINT16_VOCAB}"
            )
        parts.append(arr.astype(np.uint16))
        batch.clear()
        ends.clear()
        batch_chars = 0

    for text in texts:
        pieces = list(_chunks(text, chunk_chars))
        for i, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(i == len(pieces) - 1)
            batch_chars += len(piece)
        if batch_chars >= ENCODE_BATCH_CHARS:
            flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


# --------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PreparedData:
    """A finished cache entry. Token files are flat uint16 arrays (np.memmap them)."""

    dir: Path
    train_path: Path
    val_path: Path
    tokenizer_path: Path
    meta_path: Path
    vocab_size: int  # the tokenizer's vocabulary size (== the vocab_size asked for)
    eot_id: int
    n_train_tokens: int
    n_val_tokens: int
    key: str
    cache_hit: bool  # True when this call found the cache ready and trained nothing


def _cache_key(fingerprint: str, settings: dict, val_fraction: float, max_corpus_bytes: int | None) -> str:
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "corpus": fingerprint,
            "tokenizer": settings,
            "val_fraction": val_fraction,
            "max_corpus_bytes": max_corpus_bytes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load_cached(final: Path, key: str) -> PreparedData | None:
    """The cache entry in `final`, or None when it is missing or does not check out."""
    meta_path = final / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None
        train, val, tok = final / "train.bin", final / "val.bin", final / "tokenizer.json"
        if train.stat().st_size != 2 * meta["n_train_tokens"]:
            return None
        if val.stat().st_size != 2 * meta["n_val_tokens"]:
            return None
        if not tok.is_file():
            return None
        return PreparedData(
            dir=final,
            train_path=train,
            val_path=val,
            tokenizer_path=tok,
            meta_path=meta_path,
            vocab_size=int(meta["vocab_size"]),
            eot_id=int(meta["eot_id"]),
            n_train_tokens=int(meta["n_train_tokens"]),
            n_val_tokens=int(meta["n_val_tokens"]),
            key=key,
            cache_hit=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _select_files(files: list[Path], root: Path, max_corpus_bytes: int | None) -> list[tuple[Path, int]]:
    """Files in a spread-out deterministic order (sha1 of the path relative to the corpus
    root, the same on every machine), each with how many bytes of it to use. With a cap,
    files are taken whole in that order and the last one is cut to fit."""

    def rel(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return p.name

    ordered = sorted(files, key=lambda p: (hashlib.sha1(rel(p).encode()).hexdigest(), rel(p)))
    chosen, total = [], 0
    for p in ordered:
        size = p.stat().st_size
        if max_corpus_bytes is not None and total + size > max_corpus_bytes:
            if max_corpus_bytes - total > 0:
                chosen.append((p, max_corpus_bytes - total))
            break
        chosen.append((p, size))
        total += size
    return chosen


def _read_text(path: Path, n_bytes: int) -> str:
    with open(path, "rb") as f:
        data = f.read(n_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # A cut in the middle of a character, or a bad byte past the sniffed head.
        return data.decode("utf-8", errors="replace")


def prepare_data(
    corpus: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
    max_corpus_bytes: int | None = None,
    *,
    lock_timeout_s: float | None = None,
) -> PreparedData:
    """Tokenizer + train/val token files for `corpus`, from the cache when it is there.

    `corpus`: file, folder or None (the Python standard library), see collect_corpus.
    `max_corpus_bytes`: use at most this many bytes of the corpus (files picked in a
    deterministic spread-out order). The token stream (files in that order, each followed
    by <|endoftext|>) is split at the end: the last `val_fraction` of the tokens is val.
    Safe to call from every rank at once: one prepares under a filelock, the rest wait
    (up to `lock_timeout_s`, None = no limit) and then read the cache.
    """
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; use e.g. 0.1")
    if max_corpus_bytes is not None and (
        isinstance(max_corpus_bytes, bool) or not isinstance(max_corpus_bytes, int) or max_corpus_bytes <= 0
    ):
        raise DataError(
            f"max_corpus_bytes must be a positive int or None, got {max_corpus_bytes!r}; use e.g. 4_000_000"
        )
    _check_vocab_size(vocab_size)
    t0 = time.perf_counter()
    files = collect_corpus(corpus)
    fingerprint = corpus_fingerprint(files)
    settings = _tokenizer_settings(vocab_size)
    key = _cache_key(fingerprint, settings, float(val_fraction), max_corpus_bytes)
    cache_root = Path(cache_dir).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / key

    # A folder named <key> only ever appears through an atomic rename of a complete one,
    # so the fast path needs no lock.
    hit = _load_cached(final, key)
    if hit is not None:
        logger.info("data cache hit: %s (%d train / %d val tokens)", final, hit.n_train_tokens, hit.n_val_tokens)
        return hit

    lock = FileLock(str(cache_root / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is preparing %s; waiting for it", final)
        try:
            lock.acquire(timeout=-1 if lock_timeout_s is None else lock_timeout_s, poll_interval=0.2)
        except Timeout:
            # The lock is an flock: a dead holder releases it, so a live process holds it.
            raise DataError(
                f"waited {lock_timeout_s} s for another process preparing {final} "
                f"(it holds {lock.lock_file}); wait longer (lock_timeout_s) or stop that process"
            ) from None
    try:
        hit = _load_cached(final, key)  # another rank/process finished it while we waited
        if hit is not None:
            logger.info("data cache ready (prepared by another process): %s", final)
            return hit
        return _build(corpus, files, fingerprint, settings, key, cache_root, final, val_fraction, max_corpus_bytes, t0)
    finally:
        lock.release()


def _build(corpus, files, fingerprint, settings, key, cache_root, final, val_fraction, max_corpus_bytes, t0):
    # We hold the key's lock: any .tmp folder of this key is left over from a killed run.
    for stale in cache_root.glob(f".tmp-{key}-*"):
        logger.info("removing an unfinished data preparation: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # a cache folder that failed the checks (truncated, edited by hand)
        logger.warning("data cache %s is damaged; preparing it again", final)
        broken = cache_root / f".tmp-{key}-broken-{secrets.token_hex(4)}"
        os.rename(final, broken)
        shutil.rmtree(broken, ignore_errors=True)

    root = Path(corpus).expanduser().absolute() if corpus is not None else default_corpus_root()
    label = f"corpus {root}" + (f" capped at {max_corpus_bytes} bytes" if max_corpus_bytes else "")
    chosen = _select_files(files, root if root.is_dir() else root.parent, max_corpus_bytes)
    texts = [_read_text(p, n) for p, n in chosen]
    n_bytes = sum(n for _, n in chosen)
    t_read = time.perf_counter()
    logger.info("training a byte-level BPE tokenizer (vocab %d) on %s (%d files, %d bytes)",
                settings["vocab_size"], label, len(chosen), n_bytes)
    tok = train_tokenizer(texts, settings["vocab_size"], corpus_label=label)
    t_train = time.perf_counter()
    tokens = encode_texts(tok, texts)
    t_encode = time.perf_counter()
    del texts

    n_val = int(round(len(tokens) * val_fraction))
    n_train = len(tokens) - n_val
    if n_val < 1 or n_train < 1:
        raise DataError(
            f"{label} gives {len(tokens)} tokens: too few to split into train and val with "
            f"val_fraction={val_fraction}; use a larger corpus or another val_fraction"
        )

    tmp = cache_root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_file(tmp / "train.bin", tokens[:n_train].tobytes())
        _write_file(tmp / "val.bin", tokens[n_train:].tobytes())
        _write_file(tmp / "tokenizer.json", tok.to_str().encode())
        t_write = time.perf_counter()
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "dtype": "uint16",
            "vocab_size": tok.get_vocab_size(),
            "eot_id": tok.token_to_id(EOT_TOKEN),
            "n_train_tokens": n_train,
            "n_val_tokens": n_val,
            "val_fraction": val_fraction,
            "corpus": {
                "path": str(root),
                "fingerprint": fingerprint,
                "n_files": len(files),
                "n_files_used": len(chosen),
                "bytes_used": n_bytes,
                "max_corpus_bytes": max_corpus_bytes,
            },
            "tokenizer": settings,
            "timings_s": {
                "read": round(t_read - t0, 4),
                "train_tokenizer": round(t_train - t_read, 4),
                "encode": round(t_encode - t_train, 4),
                "write": round(t_write - t_encode, 4),
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # meta.json last: inside the folder it marks the others as complete.
        _write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(cache_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("data prepared in %.1f s: %s (%d train / %d val tokens, %.2f M tokens/s encoding)",
                time.perf_counter() - t0, final, n_train, n_val,
                len(tokens) / max(t_encode - t_train, 1e-9) / 1e6)
    result = _load_cached(final, key)
    if result is None:  # pragma: no cover - the rename above made it whole
        raise DataError(f"data cache {final} did not check out right after writing it; delete it and retry")
    return dataclasses.replace(result, cache_hit=False)


# --------------------------------------------------------------------------- dataset


class TokenBlockDataset(torch.utils.data.Dataset):
    """Map-style dataset of (x, y) int64 blocks over a uint16 token file.

    Item i is the window starting at token i * stride: x = tokens[s : s + block_size],
    y = tokens[s + 1 : s + block_size + 1]. With the default stride == block_size the
    windows do not overlap (every token is a target at most once per epoch).
    len() = (n_tokens - 1 - block_size) // stride + 1, fixed for a file, so a seedable
    sampler + skip_first_batches skip in O(1). The file is memory-mapped lazily in each
    process (DataLoader workers, spawn included, never copy the array).
    """

    def __init__(self, path: str | os.PathLike, block_size: int, stride: int | None = None):
        self.path = Path(path)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise DataError(f"block_size must be a positive int, got {block_size!r}; use e.g. 256")
        stride = block_size if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise DataError(f"stride must be a positive int, got {stride!r}; leave it unset for block_size")
        if not self.path.is_file():
            raise DataError(f"token file {self.path} does not exist; run prepare_data() first")
        size = self.path.stat().st_size
        if size % 2:
            raise DataError(f"token file {self.path} has an odd size ({size} bytes), not uint16; prepare the data again")
        self.n_tokens = size // 2
        if block_size + 1 > self.n_tokens:
            raise DataError(
                f"block size larger than the data: block_size={block_size} needs "
                f"{block_size + 1} tokens but {self.path} holds {self.n_tokens}; "
                f"use block_size <= {max(self.n_tokens - 1, 0)} or a larger corpus"
            )
        self.block_size = block_size
        self.stride = stride
        self._len = (self.n_tokens - 1 - block_size) // stride + 1
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return self._len

    def _tokens(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint16, mode="r")
        return self._data

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._len
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} blocks")
        start = i * self.stride
        window = torch.from_numpy(self._tokens()[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None  # reopened in the worker instead of pickling the tokens
        return state


class TokenStream(torch.utils.data.IterableDataset):
    """The same (x, y) windows as TokenBlockDataset, read as a stream: the token file cut into
    shards of `shard_blocks` windows (as a corpus of many files would be), the shards in a
    seeded order per epoch, each shard read front to back; DataLoader worker w of W reads
    every W-th shard of that order.

    It can say where it is (state_dict / load_state_dict: the epoch, and the shard and window
    reached, per worker), so a resumed run starts at the next window without reading the
    consumed ones (train_core/streams.py). The state is plain data: numbers in a dict."""

    def __init__(self, path: str | os.PathLike, block_size: int, *, seed: int, shard_blocks: int = 64):
        self.blocks = TokenBlockDataset(path, block_size)
        self.seed, self.shard_blocks = seed, shard_blocks
        self.epoch, self.shard, self.window = 0, 0, 0  # where the next window comes from (this worker)

    def __len__(self) -> int:  # windows per epoch, over all workers
        return len(self.blocks)

    def set_epoch(self, epoch: int) -> None:  # accelerate calls it at each epoch start
        if epoch != self.epoch:
            self.epoch, self.shard, self.window = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard, self.window = int(state["epoch"]), int(state["shard"]), int(state["window"])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n_shards = -(-len(self.blocks) // self.shard_blocks)
        order = torch.randperm(n_shards, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        mine = order[worker::workers]
        while self.shard < len(mine):
            first = mine[self.shard] * self.shard_blocks
            n = min(self.shard_blocks, len(self.blocks) - first)
            while self.window < n:
                i = first + self.window
                self.window += 1  # the state counts windows handed out
                yield self.blocks[i]
            self.shard, self.window = self.shard + 1, 0
        self.shard = 0  # the epoch is read: the next one starts at its first shard
