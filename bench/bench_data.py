"""Time the GPT example's data preparation: tokenizer training, encoding, cache hit.

    PYTHONPATH=. python bench/bench_data.py                  # stdlib capped at 4 MB
    PYTHONPATH=. python bench/bench_data.py --cap-mb 0       # the whole stdlib (~31 MB)
    PYTHONPATH=. python bench/bench_data.py --cap-mb 4 --cap-mb 0 --vocab-size 8192

Each cold run prepares into a fresh temporary cache folder; the cache-hit run repeats the
same call. Stage times come from the meta.json that prepare_data writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from examples.gpt.data import collect_corpus, corpus_fingerprint, prepare_data


def bench_one(cap_bytes: int | None, vocab_size: int, val_fraction: float) -> None:
    cache = tempfile.mkdtemp(prefix="bench-gpt-data-")
    try:
        t0 = time.perf_counter()
        cold = prepare_data(None, cache, vocab_size, val_fraction, cap_bytes)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hit = prepare_data(None, cache, vocab_size, val_fraction, cap_bytes)
        hit_s = time.perf_counter() - t0
        assert hit.cache_hit and not cold.cache_hit
        meta = json.loads(cold.meta_path.read_text())
        t = meta["timings_s"]
        n_tokens = cold.n_train_tokens + cold.n_val_tokens
        n_bytes = meta["corpus"]["bytes_used"]
        label = f"{cap_bytes / 1e6:.0f} MB cap" if cap_bytes else "uncapped"
        print(f"stdlib {label}: {meta['corpus']['n_files_used']} files, {n_bytes / 1e6:.1f} MB, "
              f"{n_tokens / 1e6:.2f} M tokens ({n_bytes / n_tokens:.2f} bytes/token), vocab {cold.vocab_size}")
        print(f"  cold prepare     {cold_s:7.2f} s  (read {t['read']:.2f} s, train tokenizer "
              f"{t['train_tokenizer']:.2f} s, encode {t['encode']:.2f} s, write {t['write']:.2f} s)")
        print(f"  encoding         {n_tokens / t['encode'] / 1e6:7.2f} M tokens/s  "
              f"({n_bytes / t['encode'] / 1e6:.1f} MB/s)")
        print(f"  tokenizer train  {n_bytes / t['train_tokenizer'] / 1e6:7.2f} MB/s")
        print(f"  cache hit        {hit_s * 1000:7.0f} ms  (cold / hit = {cold_s / hit_s:.0f}x)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-mb", type=float, action="append",
                    help="corpus cap in MB (0 = uncapped); repeat to compare; default 4")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    args = ap.parse_args()
    caps = args.cap_mb or [4.0]
    print(f"cpus: {os.cpu_count()}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}")
    t0 = time.perf_counter()
    files = collect_corpus(None)
    corpus_fingerprint(files)
    print(f"collect + fingerprint of the stdlib: {len(files)} files in {(time.perf_counter() - t0) * 1000:.0f} ms")
    for cap in caps:
        bench_one(int(cap * 1e6) if cap > 0 else None, args.vocab_size, args.val_fraction)


if __name__ == "__main__":
    main()
