"""Memory of a second run on a big text: `python -m pytest tests/test_token_memory.py`.

A second load_tokens of a text hashes it, checks its cached token file and maps it; none of that
may make this process's resident memory grow with the size of the text.
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import SHAKESPEARE, load_tokens
from smoll import data as token_cache
from smoll.files import file_sha256

LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")  # Linux 4.0 on
pytestmark = pytest.mark.skipif(not LINUX, reason="measures resident memory with Linux's /proc/self")

REPEATS = 120  # Tiny Shakespeare (1.1 MB) this many times: a 134 MB text, and a token file as big


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_growth(work):
    """How far this process's resident memory rose above where it stood, in bytes, while work ran.
    Writing 5 to clear_refs resets the peak (VmHWM) to the memory resident now, so what this
    process did before, the imports included, does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS")
    work()
    return (status_kb("VmHWM") - before) * 1024


@pytest.fixture(scope="module")
def big_text(tmp_path_factory):
    """A big text and its token file, as the first run leaves them, in their own cache folder.
    The token file is written the way encode_to_token_file writes it, from Tiny Shakespeare's ids
    repeated: encoding the whole text would take seconds."""
    folder = tmp_path_factory.mktemp("big")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMOLL_CACHE", str(folder / "cache"))
        small_ids, _ = load_tokens(SHAKESPEARE)
        small_name = f"tinyshakespeare.txt.{file_sha256(SHAKESPEARE)[:16]}"
        small_meta = token_cache.find_cached(SHAKESPEARE, small_name)
    small_ids = np.array(small_ids)
    with open(small_meta, encoding="utf-8") as f:
        small = json.load(f)
    with open(SHAKESPEARE, "rb") as f:
        chunk = f.read()
    path = folder / "big.txt"
    with open(path, "wb") as f:
        for _ in range(REPEATS):
            f.write(chunk)
    digest = file_sha256(path)
    meta = {key: value for key, value in small.items() if key != "sample_sha256"}  # the writer adds it
    meta.update(source=str(path), sha256=digest, n_ids=small["n_ids"] * REPEATS,
                counts=[n * REPEATS for n in small["counts"]])
    stem = str(folder / "cache" / f"big.txt.{digest[:16]}")
    token_cache._write_token_file(stem, meta, (small_ids for _ in range(REPEATS)))
    return str(path), stem, small_ids


@pytest.fixture(autouse=True)
def small_chunks(big_text, monkeypatch):
    """The cache folder of big_text, and reads of 1 MiB: a chunk well under the file's size."""
    monkeypatch.setenv("SMOLL_CACHE", os.path.dirname(big_text[1]))
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 1 << 20)


def test_the_id_range_check_reads_a_big_token_file_in_bounded_memory(big_text):
    _, stem, _ = big_text
    size = os.path.getsize(stem + ".bin")
    with open(stem + ".json", encoding="utf-8") as f:
        digest = json.load(f)["sha256"]
    problems = []
    grew = peak_growth(lambda: problems.append(token_cache.check_token_file(stem + ".json", digest)))
    assert problems == [None]
    assert grew < size / 16, f"checking a {size:,}-byte token file took {grew:,} more bytes of memory"


def test_a_second_load_of_a_big_text_keeps_memory_bounded(big_text, monkeypatch):
    path, _, small_ids = big_text
    monkeypatch.setattr(token_cache, "encode_to_token_file", lambda *a, **k: pytest.fail("encoded again"))
    size = os.path.getsize(path)
    loaded = []
    grew = peak_growth(lambda: loaded.append(load_tokens(path)))
    # utils.file_sha256 hashes the text 16 MiB at a time, and holds the last block while it reads
    # the next one: 32 MiB, whatever the size of the text. Everything else must stay small.
    allowed = 2 * (16 << 20) + size / 16
    assert grew < allowed, f"a second load of a {size:,}-byte text took {grew:,} more bytes of memory"
    ids, tokenizer = loaded[0]
    assert len(ids) == REPEATS * len(small_ids) and tokenizer.vocab_size == 65
    assert np.array_equal(ids[-len(small_ids):], small_ids)
