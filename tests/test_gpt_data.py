"""Data preparation of the example GPT job: corpus, tokenizer, token files, cache, dataset."""

import json
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.gpt import data as D
from examples.gpt.data import DataError, TokenBlockDataset, collect_corpus, prepare_data

REPO = Path(__file__).resolve().parents[1]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "to", "vi", "sa", "pe", "do", "qu", "zy"]


def fake_text(seed: int, n_lines: int) -> str:
    """Deterministic code-like text with enough variety to train a ~400-token BPE."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(rng.randint(2, 9))]
        indent = "    " * rng.randint(0, 2)
        lines.append(indent + rng.choice(["def ", "x = ", "return ", "", "# "]) + " ".join(words) + rng.choice(["", ":", "()", " + 1"]))
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(fake_text(i, 400))
    return root


# ------------------------------------------------------------------ collect_corpus


def test_collect_folder_recursive_sorted_skipping_hidden_binary_and_empty(tmp_path):
    root = tmp_path / "c"
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "__pycache__").mkdir()
    (root / "b" / "z.py").write_text("print('z')\n")
    (root / "a.txt").write_text("hello\n")
    (root / "empty.txt").write_text("")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9 \xe0 la cr\xe8me\n".encode("latin-1"))
    (root / ".hidden.txt").write_text("secret\n")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "__pycache__" / "m.txt").write_text("cached\n")
    assert collect_corpus(root) == [root / "a.txt", root / "b" / "z.py"]
    assert collect_corpus(root, suffixes=(".py",)) == [root / "b" / "z.py"]
    assert collect_corpus(root / "a.txt") == [root / "a.txt"]


def test_collect_returns_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hi\n")
    monkeypatch.chdir(tmp_path)
    assert collect_corpus("a.txt") == [tmp_path / "a.txt"]


def test_default_corpus_is_the_stdlib_without_site_packages_and_test_data():
    files = collect_corpus(None)
    root = D.default_corpus_root()
    rels = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 500 and files == sorted(files)
    assert all(r.endswith(".py") for r in rels)
    assert "os.py" in rels and "json/decoder.py" in rels
    assert not any(r.startswith(("site-packages/", "dist-packages/")) for r in rels)
    assert not any("/data/" in r or "tokenizedata/" in r for r in rels)


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"corpus path .*nope does not exist; pass an existing text file or folder"):
        collect_corpus(tmp_path / "nope")


def test_folder_without_text_files_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=r"holds no text files .*2 other files seen.*name a folder of text files"):
        collect_corpus(tmp_path)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty_dir holds no text files"):
        collect_corpus(empty)


def test_folder_of_empty_files_is_an_error(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"all 2 text files are empty; add text"):
        collect_corpus(tmp_path)


def test_empty_or_binary_single_file_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"corpus file .*e.txt is empty"):
        collect_corpus(tmp_path / "e.txt")
    (tmp_path / "b.dat").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match=r"b.dat is not UTF-8 text .*convert it to UTF-8"):
        collect_corpus(tmp_path / "b.dat")


# ------------------------------------------------------------------ tokenizer + encoding


@pytest.mark.parametrize(
    "vocab_size, fragment",
    [
        (65537, r"vocab_size=65537 does not fit uint16 .*use vocab_size <= 65536"),
        (100_000, r"does not fit uint16"),
        (200, r"vocab_size=200 is below the 257 tokens .*use vocab_size >= 257"),
        (512.0, r"vocab_size must be an int"),
    ],
)
def test_vocab_size_bounds(tmp_path, corpus, vocab_size, fragment):
    with pytest.raises(DataError, match=fragment):
        prepare_data(corpus, tmp_path / "cache", vocab_size=vocab_size)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unreachable_vocab_size_names_the_achieved_size(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc abc abd\n" * 10)
    with pytest.raises(DataError) as err:
        prepare_data(tmp_path / "tiny.txt", tmp_path / "cache", vocab_size=5000)
    msg = str(err.value)
    achieved = int(msg.split("reached only ")[1].split(" ")[0])
    assert 257 <= achieved < 5000
    assert f"lower vocab_size to <= {achieved} or use a larger corpus" in msg
    assert "fewer than vocab_size=5000" in msg
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-made


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(val_fraction=0), "val_fraction must be between 0 and 1"),
        (dict(val_fraction=1.0), "val_fraction must be between 0 and 1"),
        (dict(max_corpus_bytes=0), "max_corpus_bytes must be a positive int or None"),
        (dict(max_corpus_bytes=1.5), "max_corpus_bytes must be a positive int or None"),
    ],
)
def test_bad_split_and_cap_settings(tmp_path, corpus, kwargs, fragment):
    with pytest.raises(DataError, match=fragment):
        prepare_data(corpus, tmp_path / "cache", **{"vocab_size": 300, **kwargs})


def test_chunked_encoding_equals_whole_text_encoding(corpus):
    texts = [p.read_text() for p in collect_corpus(corpus)]
    texts.append("x" * 10_000 + "\n" + "y\n" * 5000)  # long lines and many short ones
    assert any(len(t) > 3 * D.ENCODE_CHUNK_CHARS for t in texts)
    tok = D.train_tokenizer(texts, 400)
    got = D.encode_texts(tok, texts)
    expected = []
    for t in texts:
        expected += tok.encode(t, add_special_tokens=False).ids + [0]
    assert got.dtype == np.uint16
    assert got.tolist() == expected
    assert tok.decode(got[: len(tok.encode(texts[0]).ids)].tolist()) == texts[0]


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = [fake_text(i, 300) + "caf\u00e9 \u00fcber 12 345 don't it's\t\r\n\n\n    \n  \n" * 20 for i in range(4)]
    return D.train_tokenizer(texts, 400)


@settings(max_examples=60, deadline=None)
@given(
    text=st.lists(st.sampled_from(list("ab z1'sé!\n\t\r ") + ["\n    ", "  ", "def", "'s"]), max_size=200).map("".join),
    chunk_chars=st.integers(min_value=1, max_value=40),
)
def test_chunk_cuts_never_change_the_tokens(small_tokenizer, text, chunk_chars):
    chunks = list(D._chunks(text, chunk_chars))
    assert "".join(chunks) == text
    # The cuts fall between pre-tokens (so the ids cannot depend on the learned merges).
    pre = small_tokenizer.pre_tokenizer
    pieces = [tok for chunk in chunks for tok, _ in pre.pre_tokenize_str(chunk)]
    assert pieces == [tok for tok, _ in pre.pre_tokenize_str(text)]
    whole = small_tokenizer.encode(text, add_special_tokens=False).ids + [0]
    assert D.encode_texts(small_tokenizer, [text], chunk_chars=chunk_chars).tolist() == whole


def test_uint16_overflow_guard_in_encoding():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {D.EOT_TOKEN: 0, "small": 1, "huge": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=D.EOT_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert D.encode_texts(tok, ["small small"]).tolist() == [1, 1, 0]
    with pytest.raises(DataError, match=r"token id 70000 does not fit uint16"):
        D.encode_texts(tok, ["small huge"])


# ------------------------------------------------------------------ prepare_data + cache


def test_prepare_writes_token_files_meta_and_tokenizer(tmp_path, corpus):
    p = prepare_data(corpus, tmp_path / "cache", vocab_size=400, val_fraction=0.1)
    assert not p.cache_hit and p.dir.parent == tmp_path / "cache" and p.dir.name == p.key
    assert p.vocab_size == 400 and p.eot_id == 0
    train = np.memmap(p.train_path, dtype=np.uint16, mode="r")
    val = np.memmap(p.val_path, dtype=np.uint16, mode="r")
    assert (len(train), len(val)) == (p.n_train_tokens, p.n_val_tokens)
    total = p.n_train_tokens + p.n_val_tokens
    assert p.n_val_tokens == round(0.1 * total)
    meta = json.loads(p.meta_path.read_text())
    assert meta["vocab_size"] == 400 and meta["n_train_tokens"] == p.n_train_tokens
    assert meta["corpus"]["fingerprint"] == D.corpus_fingerprint(collect_corpus(corpus))
    assert meta["tokenizer"]["vocab_size"] == 400 and meta["format"] == D.FORMAT_VERSION
    # The token stream decodes back to exactly the corpus files, each followed by EOT.
    tok = D.load_tokenizer(p.tokenizer_path)
    stream = np.concatenate([train, val]).tolist()
    docs, cur = [], []
    for t in stream:
        if t == 0:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == [] and sorted(docs) == sorted(f.read_text() for f in collect_corpus(corpus))
    assert int(np.max(train)) < 400
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_second_call_is_a_cache_hit_that_trains_nothing(tmp_path, corpus, monkeypatch):
    first = prepare_data(corpus, tmp_path / "cache", vocab_size=400, val_fraction=0.1)
    mtimes = {f.name: f.stat().st_mtime_ns for f in first.dir.iterdir()}

    def boom(*a, **k):
        raise AssertionError("the tokenizer was trained again on a cache hit")

    monkeypatch.setattr(D, "train_tokenizer", boom)
    monkeypatch.setattr(D, "encode_texts", boom)
    again = prepare_data(corpus, tmp_path / "cache", vocab_size=400, val_fraction=0.1)
    assert again.cache_hit and again.dir == first.dir
    assert (again.n_train_tokens, again.n_val_tokens) == (first.n_train_tokens, first.n_val_tokens)
    assert {f.name: f.stat().st_mtime_ns for f in first.dir.iterdir()} == mtimes


def test_settings_and_corpus_changes_change_the_key(tmp_path, corpus):
    cache = tmp_path / "cache"
    base = prepare_data(corpus, cache, vocab_size=400, val_fraction=0.1)
    keys = {base.key}
    for kwargs in (dict(vocab_size=420), dict(val_fraction=0.2), dict(max_corpus_bytes=20_000)):
        other = prepare_data(corpus, cache, **{"vocab_size": 400, "val_fraction": 0.1, **kwargs})
        assert not other.cache_hit and other.key not in keys
        keys.add(other.key)
    with open(corpus / "f0.txt", "a") as f:  # an edited file: new size and mtime
        f.write("def extra(): pass\n")
    edited = prepare_data(corpus, cache, vocab_size=400, val_fraction=0.1)
    assert not edited.cache_hit and edited.key not in keys
    keys.add(edited.key)
    (corpus / "new.txt").write_text(fake_text(99, 50))  # an added file
    added = prepare_data(corpus, cache, vocab_size=400, val_fraction=0.1)
    assert not added.cache_hit and added.key not in keys
    assert prepare_data(corpus, cache, vocab_size=400, val_fraction=0.1).cache_hit


def test_max_corpus_bytes_caps_the_corpus(tmp_path, corpus):
    full = prepare_data(corpus, tmp_path / "cache", vocab_size=300)
    capped = prepare_data(corpus, tmp_path / "cache", vocab_size=300, max_corpus_bytes=25_000)
    meta = json.loads(capped.meta_path.read_text())
    assert meta["corpus"]["bytes_used"] == 25_000
    assert meta["corpus"]["n_files_used"] < meta["corpus"]["n_files"]
    assert capped.n_train_tokens + capped.n_val_tokens < (full.n_train_tokens + full.n_val_tokens) / 2


def test_damaged_cache_is_rebuilt_not_trusted(tmp_path, corpus):
    first = prepare_data(corpus, tmp_path / "cache", vocab_size=300)
    with open(first.train_path, "r+b") as f:
        f.truncate(100)
    again = prepare_data(corpus, tmp_path / "cache", vocab_size=300)
    assert not again.cache_hit and again.train_path.stat().st_size == 2 * first.n_train_tokens


def test_too_little_text_to_split_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("".join(chr(c) for c in range(33, 127)))  # few tokens
    with pytest.raises(DataError, match=r"too few to split into train and val"):
        prepare_data(tmp_path / "one.txt", tmp_path / "cache", vocab_size=257, val_fraction=0.001)


_CHILD = textwrap.dedent(
    """
    import os, sys, time, json
    sys.path.insert(0, {repo!r})
    from examples.gpt import data as D
    mode, corpus, cache, marker = (sys.argv[1:] + ["", "", ""])[:4]
    real_train, real_write = D.train_tokenizer, D._write_file
    def slow_train(*a, **k):
        with open(marker + ".log", "a") as f:
            f.write("trained\\n")
        time.sleep(1.0)  # hold the lock long enough for the other process to queue
        return real_train(*a, **k)
    def stuck_write(path, data):
        real_write(path, data)
        if path.name == "train.bin":
            open(marker, "w").close()
            time.sleep(60)  # killed here, with a half-written tmp folder
    if mode == "hold":  # hold a lock file until killed
        from filelock import FileLock
        held = FileLock(corpus)  # kept in a name: a collected FileLock unlocks
        held.acquire()
        print("locked", flush=True)
        time.sleep(60)
    D.train_tokenizer = slow_train
    if mode == "kill":
        D._write_file = stuck_write
    else:
        while not os.path.exists(marker + ".go"):
            time.sleep(0.01)
    p = D.prepare_data(corpus, cache, vocab_size=300)
    print(json.dumps({{"hit": p.cache_hit, "key": p.key, "n": p.n_train_tokens}}))
    """
)


def _child(tmp_path, *args):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO)))
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_two_processes_preparing_at_once_train_once(tmp_path, corpus):
    marker = tmp_path / "race"
    procs = [_child(tmp_path, "race", corpus, tmp_path / "cache", marker) for _ in range(2)]
    time.sleep(0.3)
    (tmp_path / "race.go").touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert (tmp_path / "race.log").read_text() == "trained\n"  # exactly one process trained
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["key"] == results[1]["key"] and results[0]["n"] == results[1]["n"]


def test_lock_timeout_is_a_clear_error(tmp_path, corpus):
    cache = tmp_path / "cache"
    p = prepare_data(corpus, cache, vocab_size=300)
    with open(p.train_path, "r+b") as f:
        f.truncate(10)  # force a rebuild, which needs the lock
    holder = _child(tmp_path, "hold", cache / f"{p.key}.lock")
    assert holder.stdout.readline().strip() == "locked"
    try:
        with pytest.raises(DataError, match=r"waited 0.3 s for another process preparing .*stop that process"):
            prepare_data(corpus, cache, vocab_size=300, lock_timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()
    assert not prepare_data(corpus, cache, vocab_size=300).cache_hit


@pytest.mark.slow  # seconds of real processes: out of the fast lane
def test_kill_mid_prepare_leaves_no_trusted_half_cache(tmp_path, corpus):
    cache, marker = tmp_path / "cache", tmp_path / "stuck"
    proc = _child(tmp_path, "kill", corpus, cache, marker)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    leftovers = list(cache.glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "train.bin").exists()
    assert not (leftovers[0] / "meta.json").exists()
    assert [p for p in cache.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock")] == []
    p = prepare_data(corpus, cache, vocab_size=300)  # the dead process's lock is free again
    assert not p.cache_hit
    assert not list(cache.glob(".tmp-*"))  # the half-made folder was removed


def test_capped_stdlib_corpus(tmp_path):
    p = prepare_data(None, tmp_path / "cache", vocab_size=1024, val_fraction=0.1, max_corpus_bytes=1_000_000)
    meta = json.loads(p.meta_path.read_text())
    assert meta["corpus"]["bytes_used"] == 1_000_000
    n_files = meta["corpus"]["n_files_used"]
    total = p.n_train_tokens + p.n_val_tokens
    assert 150_000 < total < 600_000  # Python source: roughly 2-6 bytes per token
    tokens = np.concatenate([np.fromfile(p.train_path, np.uint16), np.fromfile(p.val_path, np.uint16)])
    assert int((tokens == p.eot_id).sum()) == n_files
    tok = D.load_tokenizer(p.tokenizer_path)
    assert "def " in tok.decode(tokens[:2000].tolist())
    ds = TokenBlockDataset(p.val_path, block_size=128)
    assert len(ds) == (p.n_val_tokens - 1) // 128


# ------------------------------------------------------------------ TokenBlockDataset


def write_tokens(path: Path, n: int) -> Path:
    np.arange(n, dtype=np.uint16).tofile(path)
    return path


def test_dataset_non_overlapping_windows_and_bounds(tmp_path):
    ds = TokenBlockDataset(write_tokens(tmp_path / "t.bin", 103), block_size=10)
    assert len(ds) == 10  # (103 - 1) // 10
    x, y = ds[0]
    assert x.dtype == torch.int64 and x.tolist() == list(range(10)) and y.tolist() == list(range(1, 11))
    x, y = ds[9]
    assert x.tolist() == list(range(90, 100)) and y.tolist() == list(range(91, 101))
    assert torch.equal(ds[-1][0], ds[9][0])
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(IndexError):
        ds[-11]
    exact = TokenBlockDataset(write_tokens(tmp_path / "u.bin", 11), block_size=10)
    assert len(exact) == 1 and exact[0][1].tolist() == list(range(1, 11))


def test_dataset_strided_windows(tmp_path):
    ds = TokenBlockDataset(write_tokens(tmp_path / "t.bin", 50), block_size=8, stride=4)
    assert len(ds) == (50 - 1 - 8) // 4 + 1
    last = ds[len(ds) - 1][1]
    assert int(last[-1]) <= 49
    assert ds[1][0].tolist() == list(range(4, 12))


def test_dataset_values_above_int16_survive(tmp_path):
    path = tmp_path / "big.bin"
    np.array([65535, 40000, 1, 2], dtype=np.uint16).tofile(path)
    x, y = TokenBlockDataset(path, block_size=3)[0]
    assert x.tolist() == [65535, 40000, 1] and y.tolist() == [40000, 1, 2]


def test_block_size_larger_than_the_data_is_an_error(tmp_path):
    path = write_tokens(tmp_path / "t.bin", 64)
    with pytest.raises(DataError, match=r"block size larger than the data: block_size=64 needs 65 tokens .*holds 64; use block_size <= 63"):
        TokenBlockDataset(path, block_size=64)


@pytest.mark.parametrize(
    "setup, kwargs, fragment",
    [
        ("missing", dict(block_size=4), "does not exist; run prepare_data"),
        ("odd", dict(block_size=4), "odd size"),
        ("ok", dict(block_size=0), "block_size must be a positive int"),
        ("ok", dict(block_size=4, stride=0), "stride must be a positive int"),
    ],
)
def test_dataset_bad_inputs(tmp_path, setup, kwargs, fragment):
    path = tmp_path / "t.bin"
    if setup == "ok":
        write_tokens(path, 100)
    elif setup == "odd":
        path.write_bytes(b"\x00" * 21)
    with pytest.raises(DataError, match=fragment):
        TokenBlockDataset(path, **kwargs)


def test_dataset_pickles_without_the_tokens_and_works_in_a_dataloader(tmp_path):
    ds = TokenBlockDataset(write_tokens(tmp_path / "t.bin", 20_001), block_size=100)
    ds[0]  # opens the memmap
    blob = pickle.dumps(ds)
    assert len(blob) < 2_000  # the path travels, not the 40 KB of tokens
    clone = pickle.loads(blob)
    assert torch.equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 100) and torch.equal(yb[:, :-1], xb[:, 1:])
