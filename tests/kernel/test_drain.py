"""Chunked drain (exporter/drain.py) on a real flow page: every entry exactly once, whatever the chunk.

The page is filled with BPF_MAP_UPDATE_BATCH (no traffic needed) and read back
through buffers much smaller than the page, so the kernel's bucket token has
to carry the walk across many calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from exporter.drain import Pages
from exporter.merge import merge
from tools.bench import synthetic_page
from xdp import bpfsys
from xdp.loader import Datapath

pytestmark = pytest.mark.kernel

N = 20_000


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    with Datapath(max_entries=N + N // 8 + 1024).load() as dp:
        yield dp


@pytest.mark.parametrize("chunk", [1024, 4999, 65_536])
def test_chunks_cover_the_page_exactly_once(datapath: Datapath, chunk: int) -> None:
    pages = Pages(datapath, chunk=chunk)
    idle = pages.active ^ 1
    keys, values = synthetic_page(N, datapath.cpus, time.monotonic_ns())
    assert bpfsys.map_update_batch(datapath.page_fds[idle], keys, values, N) == N
    sizes = []
    got_keys = []
    for k, _ in pages.chunks(idle):
        sizes.append(len(k))
        got_keys.append(k.copy())
    assert max(sizes) <= chunk and sum(sizes) == N
    assert len(sizes) >= N // chunk
    raw = np.concatenate(got_keys).view(f"V{keys.dtype.itemsize}")
    assert len(np.unique(raw)) == N
    assert set(raw.tolist()) == set(keys.view(f"V{keys.dtype.itemsize}").tolist())
    assert list(pages.chunks(idle)) == [], "the walk deleted what it read"


def test_flip_and_merge_equals_merge_of_the_whole_page(datapath: Datapath) -> None:
    pages = Pages(datapath, chunk=3000)
    keys, values = synthetic_page(N, datapath.cpus, time.monotonic_ns(), seed=7)
    written = pages.active  # flip_and_merge flips first, then drains the page that was active
    assert bpfsys.map_update_batch(datapath.page_fds[written], keys, values, N) == N
    m = pages.flip_and_merge(offset_ns=0)
    assert (m.page, m.entries) == (written, N)
    whole = merge(keys, values, 0)
    by_key = ["src_addr", "dst_addr", "src_port", "dst_port"]
    assert (np.sort(m.records, order=by_key) == np.sort(whole, order=by_key)).all()
