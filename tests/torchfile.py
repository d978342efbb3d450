"""Files shaped like torch.save's zip archives, without torch (store and CLI tests, benches).

The checkpoint check scans every .bin/.pkl/.pt it lists as a torch archive (train_core.safeload),
so fake checkpoints hold this instead of arbitrary bytes: a stored zip with a harmless
`archive/data.pkl` and a `archive/data/0` member padded to exactly `size` bytes.
"""

from __future__ import annotations

import io
import pickle
import zipfile


def _archive(padding: bytes, obj: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/data/0", padding)
    return buf.getvalue()


def torch_like(size: int, fill: bytes = b"o", obj: object = None) -> bytes:
    """A torch-style zip archive of exactly `size` bytes (at least ~250: the zip's own overhead)."""
    obj = {"state": {}} if obj is None else obj
    overhead = len(_archive(b"", obj))
    if size < overhead:
        raise ValueError(f"a torch-like archive needs at least {overhead} bytes, asked for {size}")
    data = _archive((fill * (size - overhead + 1))[: size - overhead], obj)
    assert len(data) == size
    return data


def torch_like_payload(marker: str) -> bytes:
    """A torch-style archive whose data.pkl runs `touch marker` when unpickled (an attack)."""
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state": Payload()}, protocol=2))
    return buf.getvalue()
