"""What train.py and play.py share: devices, text, the tokenizer, batches, checkpoints, evaluation.

Public API: load_model(path, device="cpu") -> (model, tokenizer, config).
"""

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from config import config_from_dict
from models import build_model


ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(ROOT, "dataset", "tinyshakespeare.txt")
DEFAULT_WEIGHTS = {"tinygpt": os.path.join(ROOT, "models", "tinygpt.pth"),
                   "bigram": os.path.join(ROOT, "models", "model_weights.pth")}  # the Bigram's historic name


class SmollError(Exception):
    """A problem the user can fix. Scripts print its message as one line and exit non-zero."""


# ----------------------------------------------------------------------------------------------
# Devices and precision


def get_device(name="auto"):
    """Resolve "auto" to cuda, then mps, then cpu; refuse a device this PyTorch cannot run on,
    with a sentence that names the fix (see cuda_problem)."""
    auto = name == "auto"
    if (auto or name.startswith("cuda")) and not torch.cuda.is_available():
        problem = cuda_problem(torch.version.cuda, nvidia_driver_version(), nvidia_gpu_present())
        if problem:
            raise SmollError(problem + (" Or pass --device cpu to run on the CPU." if auto else ""))
    if auto:
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SmollError(f"--device {name} was asked for, but this machine has no CUDA GPU "
                             f"(or this PyTorch was built without CUDA): use --device cpu or --device auto.")
        device = torch.device(name)
        if (device.index or 0) >= torch.cuda.device_count():
            raise SmollError(f"--device {name} was asked for, but this machine has "
                             f"{torch.cuda.device_count()} GPU(s): use cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}.")
        if torch.version.hip is None:  # ROCm names its GPU code differently
            problem = kernel_problem(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list(),
                                     torch.cuda.get_device_name(device))
            if problem:
                raise SmollError(problem + (" Or pass --device cpu to run on the CPU." if auto else ""))
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise SmollError("--device mps was asked for, but MPS is not available here: "
                         "use --device cpu or --device auto.")
    return torch.device(name)


# The oldest NVIDIA driver each CUDA major version runs on (CUDA's minor-version compatibility).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
OLD_GPU_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"


def cuda_problem(cuda_build, driver_version, gpu_present):
    """Why CUDA is unavailable although it may be wanted, as one sentence naming the fix; None when
    there is no NVIDIA GPU to use (or nothing smoll can say). Plain inputs, so tests can simulate
    any machine: cuda_build is torch.version.cuda ("13.0", or None for a CPU-only PyTorch),
    driver_version the NVIDIA driver's major version (or None)."""
    if not gpu_present:
        return None
    if cuda_build is None:
        return ("this machine has an NVIDIA GPU, but this PyTorch is a CPU-only build: install the "
                "CUDA build with `pip install -r cuda13_requirements.txt` (see the README's Install).")
    need = MIN_DRIVER.get(int(cuda_build.split(".")[0]))
    if driver_version is not None and need is not None and driver_version < need:
        return (f"this PyTorch is built for CUDA {cuda_build}, which needs NVIDIA driver {need} or "
                f"newer, but this machine has driver {driver_version}: update the driver, or install "
                f"the CUDA 12.6 build that older drivers run (`{OLD_GPU_INSTALL}`).")
    return None


def kernel_problem(capability, arch_list, name):
    """None if this PyTorch has GPU code for a device of this compute capability, else the fix.

    A kernel built for sm_XY runs on the same major version from minor Y up; PTX (compute_XY)
    is compiled at load time for any device from XY up."""
    cc = 10 * capability[0] + capability[1]
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        code = int(version.rstrip("af"))
        if (kind == "sm" and code // 10 == capability[0] and code <= cc) or (kind == "compute" and code <= cc):
            return None
    return (f"the {name} (compute capability {capability[0]}.{capability[1]}) cannot run this PyTorch "
            f"build, which has no GPU code for it (\"no kernel image\"): install the CUDA 12.6 build, "
            f"which supports it: `{OLD_GPU_INSTALL}`.")


def nvidia_driver_version(path="/proc/driver/nvidia/version"):
    """The NVIDIA kernel driver's major version on Linux (580 for 580.65.06), or None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(path, encoding="utf-8") as f:
            return int(re.search(r"\s(\d{3,})\.\d+", f.readline()).group(1))
    return None


def nvidia_gpu_present():
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def describe_device(device):
    """A human name for the device, for logs and checkpoints: "NVIDIA H100 80GB HBM3", "AMD EPYC ..."."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = names[0] if names else name
        return f"{name} CPU, {torch.get_num_threads()} threads"
    return device.type


CPU_EXTENSIONS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "AVX512-VNNI",
                  "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "asimd": "NEON", "sve": "SVE", "bf16": "BF16"}


def cpu_extensions():
    """The vector and matrix extensions this CPU reports that matter to smoll's speed, by name
    ("AVX2", "AVX512-BF16", "AMX-BF16", "NEON", ...). Empty where the OS does not say (macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return []
    flags = set(line.partition(":")[2].split())
    return [name for flag, name in CPU_EXTENSIONS.items() if flag in flags]


def cpu_has_fast_bf16():
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 is ~2x fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(device_type, capability=None, cpu_bf16=False):
    """The fastest precision a device runs natively, which is what --dtype auto means.

    CUDA: bfloat16 from compute capability 8.0 on (A100, RTX 30xx and later, H100). Older cards
    (T4, V100, RTX 20xx) only emulate bfloat16, but their tensor cores run float16 many times
    faster than float32: float16 there, with a gradient scaler in training. CPUs: bfloat16 with
    AVX512-BF16 or AMX instructions, float32 otherwise. Apple's MPS: float32.
    """
    if device_type == "cuda":
        return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16
    if device_type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name, device):
    """--dtype: float32, bfloat16, float16, or auto (pick_dtype for this device)."""
    if name != "auto":
        return DTYPES[name]
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return pick_dtype(device.type, capability, device.type == "cpu" and cpu_has_fast_bf16())


def synchronize(device):
    """Wait for the device's queued work, so that a timing measures the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device, dtype):
    """Mixed precision for the forward pass: matmuls in bf16 or fp16, weights and optimizer in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Choices timed on this machine (play.py's sampling path, train.py's attention), kept for next time


def decisions_path(name):
    """Where timings are kept: in $SMOLL_CACHE, or in smoll's folder of the user's cache
    ($XDG_CACHE_HOME/smoll or ~/.cache/smoll), the same folders as the token files."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.environ.get("SMOLL_CACHE") or os.path.join(home, "smoll"), name)


def read_decisions(path):
    """The stored timings, or {} when there are none or they cannot be read (then they are remade)."""
    try:
        with open(path, encoding="utf-8") as f:
            decisions = json.load(f)
        return decisions if isinstance(decisions, dict) else {}
    except (OSError, ValueError):
        return {}


def write_decisions(path, decisions):
    """Store the timings atomically; a cache that cannot be written only costs the next run time."""
    with contextlib.suppress(SmollError), replaced_atomically(path, ".json", "w") as f:
        json.dump(decisions, f, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Text and tokenizer


def read_text(path, flag="--data"):
    """Read a UTF-8 text file, with a clear error for each way it can be unusable."""
    if not os.path.isfile(path):
        raise SmollError(f"text file '{path}' does not exist: pass an existing file with {flag}.")
    try:
        with reading(path, flag), open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SmollError(f"'{path}' is not UTF-8 text: convert it first, for example with "
                         f"`iconv -t UTF-8 {path} > text.txt`.") from None
    if not text:
        raise SmollError(f"'{path}' is empty: give {flag} a file with some text in it.")
    return text


UNKNOWN = "\ufffd"  # the symbol rare characters become with --min_char_count: "�"


class CharTokenizer:
    """Maps each character of the vocabulary to its index in the sorted list of characters.

    With unknown set (a character of the vocabulary), characters outside the vocabulary encode
    as that one instead of being refused.
    """

    def __init__(self, chars, unknown=None):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.unknown = unknown

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s, what="the text"):
        if self.unknown is not None:
            return [self.stoi.get(ch, self.stoi[self.unknown]) for ch in s]
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            shown = " ".join(repr(ch) for ch in unknown[:10])
            raise SmollError(f"{what} has {len(unknown)} character(s) this model never saw in "
                             f"training ({shown}): remove or replace them.")
        return [self.stoi[ch] for ch in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


# ----------------------------------------------------------------------------------------------
# Token files: a text of any size, in bounded memory
#
# The first run on a text encodes it once, in pieces, into a file of character ids: uint8, uint16
# or uint32, the smallest that holds its vocabulary. Every later run, and every torchrun rank,
# reads that file through a memory map, so memory use does not grow with the text. The file is
# cached in .smoll_cache/ beside the text (or in ~/.cache/smoll/ when that folder is read-only;
# the SMOLL_CACHE environment variable names another folder) under the text's SHA-256, so an
# edited text is never trained from a stale cache. Deleting the folder is always safe.
# A cached file is checked each time it is opened (check_token_file): one that does not match its
# description or its text, or holds an id outside its vocabulary, is encoded again.

CHUNK_BYTES = 1 << 24  # how much of the text is decoded at a time while encoding
FULL_EVAL_CHARS = 1 << 18  # a validation split up to this size is scored whole; a larger one is sampled


def cache_dirs(text_path):
    """The folders where the token file of text_path may be kept, most preferred first."""
    if os.environ.get("SMOLL_CACHE"):
        return [os.environ["SMOLL_CACHE"]]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(os.path.dirname(os.path.abspath(text_path)), ".smoll_cache"),
            os.path.join(home, "smoll")]


def load_tokens(path, flag="--data", progress=True, min_count=1):
    """The character ids of the UTF-8 text at path, memory-mapped, and its tokenizer.

    Returns (ids, tokenizer): ids is a read-only 1-D numpy array, with ids[i] the id of the i-th
    character; the vocabulary is every character of the text, sorted. With min_count > 1, the
    characters that occur fewer times all become UNKNOWN. The text is encoded the first time and
    cached (see above); later calls only hash it to find its token file.
    """
    if not os.path.isfile(path):
        raise SmollError(f"text file '{path}' does not exist: pass an existing file with {flag}.")
    if os.path.getsize(path) == 0:
        raise SmollError(f"'{path}' is empty: give {flag} a file with some text in it.")
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
                meta_path = merge_rare_characters(meta_path, min_count, os.path.join(folder, merged))
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
        ids = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_ids,))
        top = max(int(ids[i:i + CHUNK_BYTES].max()) for i in range(0, n_ids, CHUNK_BYTES))
        if top >= len(vocab):
            return f"holds the id {top}, outside its vocabulary of {len(vocab)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"cannot be read ({e.__class__.__name__}: {e})"
    return None


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _open_token_file(meta_path):
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    ids = np.memmap(meta_path[:-len(".json")] + ".bin", dtype=meta["dtype"], mode="r",
                    shape=(meta["n_ids"],))
    return ids, CharTokenizer(meta["vocab"], UNKNOWN if meta.get("min_count", 1) > 1 else None)


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


def merge_rare_characters(meta_path, min_count, stem):
    """Write stem.bin, the token file of meta_path with the characters seen fewer than min_count
    times all turned into UNKNOWN (--min_char_count), and stem.json. Returns the .json's path."""
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    keep = [ch for ch, n in zip(meta["vocab"], meta["counts"]) if n >= min_count]
    vocab = sorted(set(keep) | {UNKNOWN})
    new_id = {ch: i for i, ch in enumerate(vocab)}
    dtype = id_dtype(len(vocab))
    to_new = np.array([new_id[ch if n >= min_count else UNKNOWN] for ch, n in zip(meta["vocab"], meta["counts"])],
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


def split_data(data, block_size):
    """First 90% of the ids for training, last 10% for validation; both must hold one block."""
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    if len(val) < block_size + 1:
        need = math.ceil((block_size + 1) / 0.1)
        raise SmollError(f"the text is too short for block_size {block_size}: its 10% validation "
                         f"split has {len(val)} characters but needs {block_size + 1}. Use a text "
                         f"of at least {need} characters, or a smaller --block_size.")
    return train, val


def windows(data, starts, length, device="cpu"):
    """Rows data[s : s + length] for each start s, as an int64 tensor (len(starts), length) on device.

    data is a numpy array (a memory-mapped token file) or a CPU tensor; only the rows are copied.
    For a GPU they go through pinned memory and a non-blocking copy, so the host does not wait for
    the GPU to finish its queued work.
    """
    rows = np.asarray(data)[np.asarray(starts)[:, None] + np.arange(length)]  # (B, length)
    rows = torch.from_numpy(rows.astype(np.int64))
    # The gather mapped the pages around each row into this process. They stay in the OS's file
    # cache, shared by all processes, but unless they are unmapped they count towards this
    # process's resident memory, which would then grow with the text.
    mapping = getattr(data, "_mmap", None)  # np.memmap's mmap object
    if mapping is not None and hasattr(mapping, "madvise"):  # not on Windows
        mapping.madvise(mmap.MADV_DONTNEED)
    device = torch.device(device)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def get_batch(data, batch_size, block_size, generator=None, device="cpu"):
    """Random windows of data: inputs x and targets y (x shifted left by one), each (B, T)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    rows = windows(data, starts.numpy(), block_size + 1, device)  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


def eval_windows(n_ids, block_size, max_chars=FULL_EVAL_CHARS):
    """Where to score a split of n_ids ids: (starts, tail). Each start begins a window of block_size
    targets; tail > 0 adds one shorter window of the last tail targets.

    Up to max_chars targets (or with max_chars=None), every target is scored once, in
    non-overlapping windows. Past that, max_chars // block_size windows spread evenly over the
    split: the same in every run, so scores stay comparable.
    """
    n_targets = n_ids - 1
    if max_chars is None or n_targets <= max_chars:
        return np.arange(n_targets // block_size) * block_size, n_targets % block_size
    count = max(1, max_chars // block_size)
    return np.linspace(0, n_targets - block_size, count).round().astype(np.int64), 0


@torch.no_grad()
def eval_loss(model, data, block_size, batch_size=32, device="cpu", dtype=torch.float32,
              max_chars=FULL_EVAL_CHARS):
    """Mean cross-entropy over the windows of eval_windows. Returns (loss, characters scored).

    Each position is predicted from the characters before it inside its window. Scored whole,
    two models on the same split are exactly comparable.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    starts, tail = eval_windows(len(data), block_size, max_chars)
    total, n_scored = 0.0, 0
    pieces = [(starts[i:i + batch_size], block_size) for i in range(0, len(starts), batch_size)]
    if tail:
        pieces.append((np.array([len(data) - 1 - tail]), tail))
    for batch_starts, length in pieces:
        rows = windows(data, batch_starts, length + 1, device)  # (B, T+1)
        with autocast(device, dtype):
            _, loss = model(rows[:, :-1], rows[:, 1:])
        total += loss.item() * batch_starts.size * length
        n_scored += batch_starts.size * length
    model.train(was_training)
    return total / n_scored, n_scored


# ----------------------------------------------------------------------------------------------
# Files that cannot be written: one sentence that names the file, the cause and the fix

WRITE_FAILURES = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "free some space, or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or write to another disk"),
    errno.EFBIG: ("the file would grow past the largest size this system allows",
                  "raise the limit (`ulimit -f`), or write to another disk"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("the system does not allow writing there", "write to another folder"),
    errno.EROFS: ("the file system is read-only", "write to another disk"),
    errno.EISDIR: ("a folder has that name", "pick a file name that is free"),
    errno.ENOTDIR: ("a file stands where one of its folders should be", "pick another path"),
    errno.EEXIST: ("a file stands where one of its folders should be", "pick another path"),
    errno.ENOENT: ("its folder does not exist and cannot be made (a missing drive?)", "pick another path"),
    errno.EIO: ("the disk reported an error", "check the disk, or write to another one"),
}


def write_failure(path, error, flag=None):
    """A SmollError for an OSError met while writing path: the file, the cause and a fix."""
    cause, fix = WRITE_FAILURES.get(error.errno, (error.strerror or str(error), "write somewhere else"))
    source = f" (the path comes from {flag})" if flag else ""
    return SmollError(f"could not write '{path}': {cause}; {fix}{source}. Files written before are unchanged.")


@contextlib.contextmanager
def writing(path, flag=None):
    """Turn an OSError raised while writing path into write_failure's sentence."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (BrokenPipeError, ConnectionError)):
            raise
        raise write_failure(path, e, flag) from None


@contextlib.contextmanager
def reading(path, flag=None):
    """Turn an OSError raised while reading path (a disk error, a file that vanished) into one sentence."""
    try:
        yield
    except OSError as e:
        source = f" (the path comes from {flag})" if flag else ""
        raise SmollError(f"could not read '{path}': {e.strerror or e}{source}. Check the disk, or "
                         f"copy the file somewhere else.") from None


def check_writable(path, flag="--out"):
    """Make sure a file can be written at path before any work is done: its folder exists or can
    be made, path is not a folder, and a file can be created there. Raises write_failure's error."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path, flag):
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
        os.close(fd)
        os.remove(probe)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# A checkpoint is one dict of plain types and tensors, so it loads with weights_only=True:
#   model_state  the state_dict; float16 in the best checkpoint to halve the file (loading casts
#                it back), float32 in the NAME.last.pth training state
#   config       the Config as a dict; config["model"] names the model type
#   vocab        the characters, in id order
#   step         the optimizer step it was taken at
#   val_loss     the validation loss estimate of the best step so far
#   history      one dict per evaluation: step, train_loss, val_loss, lr, tokens_per_s, time_s
#   run          where and how it was trained: git commit, device, dtype, torch, time, figures
# The NAME.last.pth training state adds optimizer, rng, best_step and finished, for --resume.


def temp_file(folder, suffix):
    """A new temp file in folder, to be renamed into place once written. Returns (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
    return fd, tmp


@contextlib.contextmanager
def replaced_atomically(path, suffix, mode="wb", make_folder=True):
    """A file to write in place of path: a temp file beside it, renamed over path once the block
    ends. A crash, a full disk or Ctrl-C mid-write leaves the old file untouched, never a
    half-written one, and no temp file behind; an OSError becomes write_failure's SmollError."""
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        if make_folder:
            os.makedirs(folder, exist_ok=True)
        fd, tmp = temp_file(folder, suffix)
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def atomic_save(obj, path):
    """torch.save into a temp file beside path, then rename over it (see replaced_atomically)."""
    with replaced_atomically(path, ".pth") as f:
        torch.save(obj, f)


def to_cpu(obj):
    """A copy of a nested dict/list structure with every tensor moved to the CPU, so that a
    checkpoint from a GPU loads with weights_only=True on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path, model, config, tokenizer, step, val_loss, half=True, **extra):
    """Save a self-describing checkpoint atomically; extra keys (history, run, ...) are added as is."""
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    checkpoint = {"model_state": state, "config": asdict(config), "vocab": tokenizer.chars,
                  "step": step, "val_loss": val_loss, **extra}
    atomic_save(checkpoint, path)


def load_checkpoint(path, flag="--weights"):
    """Read a checkpoint dict, turning every way a file can be wrong into one clear SmollError.
    flag names the command-line option that gave the path, for the message."""
    if not os.path.isfile(path):
        raise SmollError(f"weights file '{path}' does not exist: train one with `python train.py` "
                         f"or pass an existing file with {flag}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        shipped = os.path.abspath(path) in DEFAULT_WEIGHTS.values()
        fix = f"restore it with `git checkout -- {path}`" if shipped else "retrain it with `python train.py`"
        raise SmollError(f"'{path}' is not a readable smoll checkpoint (truncated, corrupt or not "
                         f"a PyTorch file): {fix}.") from None
    keys = ("model_state", "config", "vocab", "step", "val_loss")
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in keys):
        raise SmollError(f"'{path}' is a PyTorch file but not a smoll checkpoint: pass weights "
                         f"written by smoll's train.py.")
    return checkpoint


def load_model(path, device="cpu", flag="--weights"):
    """Load a checkpoint into a ready-to-sample model. Returns (model, tokenizer, config).

    The model is in eval mode, in float32, on device. Its type comes from the checkpoint.
    """
    checkpoint = load_checkpoint(path, flag)
    config = config_from_dict(checkpoint["config"])
    tokenizer = CharTokenizer(checkpoint["vocab"], UNKNOWN if config.min_char_count > 1 else None)
    try:
        model = build_model(config, tokenizer.vocab_size)
        model.load_state_dict(checkpoint["model_state"])  # copies cast float16 back to float32
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise SmollError(f"'{path}' does not match the model it describes (its weights and config "
                         f"disagree): retrain it with `python train.py`.") from None
    model.to(device).eval()
    return model, tokenizer, config


def git_commit():
    """The commit the code was run from, with "-dirty" for uncommitted changes, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------------------------
# Pictures. matplotlib is optional: it is imported only when a picture is drawn.


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SmollError("drawing pictures needs matplotlib: `pip install matplotlib`.") from None
    matplotlib.use("Agg")  # draw to files; no window needed
    import matplotlib.pyplot as plt
    return plt


def plot_history(history, path, title=""):
    """Draw train and val loss against the step, and save it as a PNG."""
    plt = import_pyplot()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120, layout="constrained")
    ax.plot(steps, [h["train_loss"] for h in history], marker=".", label="train")
    ax.plot(steps, [h["val_loss"] for h in history], marker=".", label="val")
    best = min(history, key=lambda h: h["val_loss"])
    ax.scatter([best["step"]], [best["val_loss"]], marker="*", s=150, color="C1", zorder=3,
               label=f"best val {best['val_loss']:.3f} (step {best['step']})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(plt, fig, path)


def save_figure(plt, fig, path):
    """Save a figure (its format from path's extension, PNG without one) through a temp file
    renamed into place, so a failed write leaves any earlier picture whole; close it whatever happens."""
    kind = os.path.splitext(path)[1][1:].lower() or "png"
    try:
        with replaced_atomically(path, "." + kind, make_folder=False) as f:
            fig.savefig(f, format=kind)
    finally:
        plt.close(fig)


def plot_attention(maps, chars, path, title=""):
    """Draw attention maps (n_layer, n_head, T, T) as a grid of heatmaps, one per layer and head.

    Row t of a panel shows how much the character at t attends to each earlier character.
    """
    plt = import_pyplot()
    n_layer, n_head, T, _ = maps.shape
    size = 1.2 + 0.12 * T  # inches per panel, so the tick labels stay readable
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), dpi=100,
                             squeeze=False, layout="constrained")
    labels = ["␣" if c == " " else repr(c)[1:-1] if c.isspace() else c for c in chars]  # "\n" shows
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(T), labels, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
    fig.suptitle(title)
    save_figure(plt, fig, path)
