"""Token files: a text too big to read at once, encoded once and read in bounded memory.

    load_token_file(path) -> (ids, vocabulary)

utils.load_text_ids calls it for a text over utils.BIG_TEXT_BYTES; it gives exactly the ids and the
vocabulary that utils.CharTokenizer gives the whole text (tests/test_data.py checks), without ever
holding the text in memory. Everything else here is how the encoded text is kept, found again and
checked.

The first run on a text encodes it once, in pieces, into a file of character ids: uint8, uint16 or
uint32, the smallest that holds its vocabulary. Every later run, and every torchrun process, reads
that file through a memory map, so memory use does not grow with the text. The file is cached in
.smoll_cache/ beside the text (or in ~/.cache/smoll/ when that folder is read-only; the SMOLL_CACHE
environment variable names another folder) under the text's SHA-256, so an edited text is never
trained from a stale cache. Deleting the folder is always safe. A cached file is checked each time
it is opened (check_token_file): one that does not match its description or its text, or holds an
id outside its vocabulary, is encoded again.
"""

import contextlib
import errno
import hashlib
import json
import os
import sys

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from smoll.files import SmollError, file_sha256, reading, temp_file, user_cache_dir, write_failure

CHUNK_BYTES = 1 << 24  # how much of a file is read at a time: the text while encoding, the ids while checking

def cache_dirs(text_path):
    """The folders where the token file of text_path may be kept, most preferred first."""
    if os.environ.get("SMOLL_CACHE"):
        return [os.environ["SMOLL_CACHE"]]
    return [os.path.join(os.path.dirname(os.path.abspath(text_path)), ".smoll_cache"), user_cache_dir()]


def load_token_file(path, flag="--data", min_count=1, unknown="\ufffd"):
    """The character ids of the UTF-8 text at path, memory-mapped, and its vocabulary.

    Returns (ids, chars): ids is a read-only 1-D numpy array, with ids[i] the id of the i-th
    character; chars is every character of the text, sorted. With min_count > 1, the characters
    that occur fewer times all become `unknown`. The text is encoded the first time and cached (see
    above); later calls only hash it to find its token file. Under torchrun, the first process of
    each machine encodes the text while the others wait, then they all read its token file.
    """
    if not os.path.isfile(path):
        raise SmollError(f"text file '{path}' does not exist: pass an existing file with {flag}.")
    if os.path.getsize(path) == 0:
        raise SmollError(f"'{path}' is empty: give {flag} a file with some text in it.")
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if several and not first:
        dist.barrier()
    try:
        return _load_token_file(path, flag, min_count, unknown, progress=first)
    finally:
        if several and first:
            dist.barrier()


def _load_token_file(path, flag, min_count, unknown, progress):
    with reading(path, flag):
        digest = file_sha256(path)
    name = f"{os.path.basename(path)}.{digest[:16]}"  # the whole vocabulary's token file
    merged = name + f".min{min_count}" if min_count > 1 else None  # the rare characters merged
    if cached := find_valid(path, merged or name, digest):
        return _open_token_file(cached)
    errors = []
    for folder in cache_dirs(path):  # the first folder that can be written to
        try:
            os.makedirs(folder, exist_ok=True)
            meta_path = find_valid(path, name, digest) or encode_to_token_file(path, folder, digest, progress)
            if merged:
                meta_path = merge_rare_characters(meta_path, min_count, unknown, os.path.join(folder, merged))
            return _open_token_file(meta_path)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise write_failure(folder, e, "SMOLL_CACHE") from None
            errors.append(f"{folder} ({e.strerror})")  # a read-only data folder: try the next one
    raise SmollError(f"no folder to cache the encoded text of '{path}' in could be written: "
                     f"{'; '.join(errors)}. Set SMOLL_CACHE to a writable folder.")


def find_cached(text_path, name):
    """The path of the cached NAME.json of a text, or None."""
    for folder in cache_dirs(text_path):
        if os.path.isfile(os.path.join(folder, name + ".json")):
            return os.path.join(folder, name + ".json")
    return None


def find_valid(text_path, name, digest):
    """find_cached, but a cached token file that fails check_token_file is deleted, with one line
    saying why, and None is returned: the caller encodes the text again."""
    meta_path = find_cached(text_path, name)
    if meta_path is None:
        return None
    problem = check_token_file(meta_path, digest)
    if problem is None:
        return meta_path
    print(f"the cached token file '{meta_path[:-len('.json')]}.bin' {problem}: encoding "
          f"'{text_path}' again", file=sys.stderr)
    for stale in (meta_path, meta_path[:-len(".json")] + ".bin"):
        with contextlib.suppress(OSError):
            os.remove(stale)
    return None


TOKEN_DTYPES = ("uint8", "uint16", "uint32")
SAMPLED_BLOCKS, SAMPLED_BLOCK_BYTES = 64, 1 << 16  # what sample_digest reads: 4 MiB at most


def sample_digest(path):
    """SHA-256 of the whole file up to 4 MiB; past that, of 64 blocks of 64 KiB spread evenly
    over it, the first and the last included. Cheap for a gigabyte, and it sees a file cut short,
    padded, or damaged in any of the blocks it reads."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLED_BLOCKS * SAMPLED_BLOCK_BYTES:
            digest.update(f.read())
        else:
            for i in range(SAMPLED_BLOCKS):
                f.seek(i * (size - SAMPLED_BLOCK_BYTES) // (SAMPLED_BLOCKS - 1))
                digest.update(f.read(SAMPLED_BLOCK_BYTES))
    return digest.hexdigest()


def largest_id(bin_path, dtype):
    """The largest id in a token file, read CHUNK_BYTES at a time with plain file reads into one
    buffer. Not through a memory map: every page read through one stays in this process's
    resident memory, which would then grow to the size of the file."""
    ids = np.empty(max(1, CHUNK_BYTES // np.dtype(dtype).itemsize), dtype=dtype)  # one buffer for every read
    top = 0
    with open(bin_path, "rb") as f:
        while n_bytes := f.readinto(memoryview(ids).cast("B")):
            if n_bytes >= ids.itemsize:
                top = max(top, int(ids[:n_bytes // ids.itemsize].max()))
    return top


def check_token_file(meta_path, text_digest):
    """None if the cached NAME.json and NAME.bin are whole and belong to the text whose SHA-256
    is text_digest; otherwise what is wrong with them, as words for a message."""
    bin_path = meta_path[:-len(".json")] + ".bin"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        n_ids, dtype, vocab = meta["n_ids"], meta["dtype"], meta["vocab"]
        if not (isinstance(n_ids, int) and n_ids > 0 and dtype in TOKEN_DTYPES and isinstance(vocab, list)
                and vocab and all(isinstance(ch, str) and len(ch) == 1 for ch in vocab)):
            return "has a description that does not make sense"
        if meta["sha256"] != text_digest:
            return "was made from another version of the text"
        if "sample_sha256" not in meta:
            return "was written by an older smoll, without the check it now needs"
        size = os.path.getsize(bin_path)
        if size != n_ids * np.dtype(dtype).itemsize:
            return f"is {size:,} bytes long where its description says {n_ids * np.dtype(dtype).itemsize:,}"
        if sample_digest(bin_path) != meta["sample_sha256"]:
            return "is not what was written (its bytes have changed)"
        top = largest_id(bin_path, dtype)
        if top >= len(vocab):
            return f"holds the id {top}, outside its vocabulary of {len(vocab)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"cannot be read ({e.__class__.__name__}: {e})"
    return None



def _open_token_file(meta_path):
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    ids = np.memmap(meta_path[:-len(".json")] + ".bin", dtype=meta["dtype"], mode="r",
                    shape=(meta["n_ids"],))
    return ids, meta["vocab"]


def _write_token_file(stem, meta, pieces):
    """Write the id arrays of pieces to stem.bin and meta to stem.json, through temp files renamed
    into place at the end, so that a failure never leaves a half-written cache behind."""
    folder = os.path.dirname(stem)
    temps = []
    try:
        fd, tmp_bin = temp_file(folder, ".bin")
        temps.append(tmp_bin)
        with os.fdopen(fd, "wb") as f:
            for ids in pieces:
                f.write(ids.tobytes())
        meta = {**meta, "sample_sha256": sample_digest(tmp_bin)}  # checked each time it is opened
        fd, tmp_meta = temp_file(folder, ".json")
        temps.append(tmp_meta)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(tmp_bin, stem + ".bin")
        os.replace(tmp_meta, stem + ".json")  # last: a .json file means its .bin is complete
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SmollError(f"the disk is full: '{folder}' has no room for the encoded text of "
                             f"'{meta['source']}'. Free some space, or set SMOLL_CACHE to a folder on "
                             f"a disk with room.") from None
        if e.errno in (errno.EFBIG, errno.EDQUOT, errno.EIO):
            raise write_failure(stem + ".bin", e, "SMOLL_CACHE") from None
        raise
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    _remove_stale_caches(folder, meta["source"], meta["sha256"])
    return stem + ".json"


def id_dtype(vocab_size):
    """The smallest unsigned integer type that holds every id of a vocabulary."""
    return next(t for t in (np.uint8, np.uint16, np.uint32) if vocab_size <= np.iinfo(t).max + 1)


def encode_to_token_file(path, folder, digest, progress=True):
    """Encode the text at path into folder/NAME.HASH.bin and its description NAME.HASH.json.

    Two passes over the text, CHUNK_BYTES at a time: the first counts the characters (the
    vocabulary), the second maps them to ids and writes them (see _write_token_file). Returns the
    path of the .json file.
    """
    stem = os.path.join(folder, f"{os.path.basename(path)}.{digest[:16]}")
    size = os.path.getsize(path)
    bar = tqdm(total=2 * size, unit="B", unit_scale=True, desc=f"encoding {os.path.basename(path)}",
               disable=not progress or size < 32 * 2**20, leave=False)
    counts = np.zeros(0x110000, dtype=np.int64)  # one per Unicode code point
    for codes in _code_points(path, bar):
        counts[:codes.max() + 1] += np.bincount(codes)
    vocab_codes = np.flatnonzero(counts)
    dtype = id_dtype(len(vocab_codes))
    to_id = np.zeros(len(counts), dtype=dtype)
    to_id[vocab_codes] = np.arange(len(vocab_codes))  # code point -> id, in sorted order
    meta = {"source": os.path.abspath(path), "sha256": digest, "n_ids": int(counts.sum()),
            "dtype": np.dtype(dtype).name, "vocab": [chr(c) for c in vocab_codes],
            "counts": counts[vocab_codes].tolist()}
    second = hashlib.sha256()

    def pieces():
        yield from (to_id[codes] for codes in _code_points(path, bar, second))
        if second.hexdigest() != digest:  # checked before the files are renamed into place
            raise SmollError(f"'{path}' changed while it was being encoded: run again once "
                             f"nothing is writing to it.")

    try:
        return _write_token_file(stem, meta, pieces())
    finally:
        bar.close()


def merge_rare_characters(meta_path, min_count, unknown, stem):
    """Write stem.bin, the token file of meta_path with the characters seen fewer than min_count
    times all turned into `unknown` (--min_char_count), and stem.json. Returns the .json's path."""
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    keep = [ch for ch, n in zip(meta["vocab"], meta["counts"]) if n >= min_count]
    vocab = sorted(set(keep) | {unknown})
    new_id = {ch: i for i, ch in enumerate(vocab)}
    dtype = id_dtype(len(vocab))
    to_new = np.array([new_id[ch if n >= min_count else unknown] for ch, n in zip(meta["vocab"], meta["counts"])],
                      dtype=dtype)  # old id -> new id
    counts = np.zeros(len(vocab), dtype=np.int64)
    np.add.at(counts, to_new.astype(np.int64), meta["counts"])

    def pieces():  # read with plain file reads, not the memory map, so memory stays flat
        with open(meta_path[:-len(".json")] + ".bin", "rb") as f:
            while len(old := np.fromfile(f, dtype=meta["dtype"], count=CHUNK_BYTES)):
                yield to_new[old]

    merged = {**meta, "dtype": np.dtype(dtype).name, "vocab": vocab, "counts": counts.tolist(),
              "min_count": min_count}
    return _write_token_file(stem, merged, pieces())


def _code_points(path, bar, digest=None):
    """Yield the text's Unicode code points as numpy arrays, CHUNK_BYTES of the file at a time.

    A UTF-8 character split between two reads is carried over to the next one, so the pieces
    decode exactly as the whole text would. Invalid UTF-8 stops with the offset of the bad byte.
    Line endings become "\n", as when Python reads a text file: "\r\n" (Windows) and "\r".
    """
    offset, carry = 0, b""
    with reading(path), open(path, "rb", buffering=0) as f:  # unbuffered: each read sees the file as it is now
        while raw := f.read(CHUNK_BYTES):
            if digest is not None:
                digest.update(raw)
            bar.update(len(raw))
            data = carry + raw
            cut = _last_whole_character_end(data)
            if cut:
                yield _decode(data[:cut], path, offset)
            carry, offset = data[cut:], offset + cut
    if carry:
        yield _decode(carry, path, offset)  # the file's last "\r", or a character cut short: an error


def _last_whole_character_end(data):
    """The length of data without what the next read may complete: a multi-byte character, or a
    "\r" whose "\n" may follow."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte (10xxxxxx): a character starts here
            length = 1 if byte < 0x80 else 2 if byte >= 0xC0 and byte < 0xE0 else 3 if byte < 0xF0 else 4
            if length > back or byte == 0x0D:  # 0x0D is "\r"
                return len(data) - back
            return len(data)
    return len(data)  # four continuation bytes in a row: invalid, and _decode will say where


def _decode(data, path, offset):
    if data.isascii():  # the usual case, and 4x faster
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return np.frombuffer(data, dtype=np.uint8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SmollError(f"'{path}' is not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
                         f"{offset + e.start:,} is not valid UTF-8. Convert the file first, e.g. "
                         f"`iconv -f LATIN1 -t UTF-8 {path} > text.txt`, or remove that byte.") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _remove_stale_caches(folder, source, sha256):
    """Delete the token files of earlier versions of the same text, so edits do not pile up."""
    for name in os.listdir(folder):
        meta_path = os.path.join(folder, name)
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta["source"] == source and meta["sha256"] != sha256:
                os.remove(meta_path[:-len(".json")] + ".bin")
                os.remove(meta_path)

