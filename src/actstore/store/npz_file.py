"""Write an NPZ file (what ``numpy.savez_compressed`` writes, read back by ``numpy.load``),
deflating only the members that deflate.

Activations are floats whose low bits look random: they deflate by 5 to 20%, logits often
by less, and deflate runs at 25-30 MB/s here whatever its level. A zip member may be
stored or deflated, each on its own, and every zip reader (``numpy.load``, Activation
Lab's loaders) reads both. With the export's other changes, an export of SmolLM2 took
half the CPU time (2.0x less), one of the tests' tiny model, mostly logits, 2.5x less, for
files 7-8% bigger: benchmarks/bench_npz_export.py.
"""

from __future__ import annotations

import time
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# A member is deflated when a sample of it (from its middle: the start is a header-like
# first layer or position) shrinks below this fraction at deflate's fastest level. The
# sample costs what deflating it costs (0.5 ms); on the 300 members of Activation Lab's
# fixture files above its size, it decided as the whole member would every time.
DEFLATE_BELOW = 0.9
SAMPLE_BYTES = 1 << 14


def deflates(a: np.ndarray) -> bool:
    """Whether deflating ``a`` is worth its time (a small member always is: it costs little)."""
    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    if len(data) <= SAMPLE_BYTES:
        return True
    mid = (len(data) - SAMPLE_BYTES) // 2
    return len(zlib.compress(data[mid : mid + SAMPLE_BYTES].tobytes(), 1)) < DEFLATE_BELOW * SAMPLE_BYTES


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``arrays`` as ``path``, one ``<name>.npy`` member each, in the order given."""
    stamp = time.localtime()[:6]
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED if deflates(a) else zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
