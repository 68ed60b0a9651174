"""Token files, the cache and evaluation of big texts: `python -m pytest tests/test_data.py`."""

import errno
import json
import os

import numpy as np
import pytest
import torch

import play
import utils
from config import make_config
from conftest import SHAKESPEARE, load_tokens
from smoll import data as token_cache
from smoll.eval_table import to_model_ids
from smoll.files import SmollError
from train import train
from utils import UNKNOWN, CharTokenizer, eval_loss, eval_chunks, load_text_ids

# 1-, 2-, 3- and 4-byte UTF-8 characters, so that small reads split them every possible way
MIXED = "To be, or not to be: café, naïve, Ελληνικά, 日本語の文章, emoji 🎭🐍!\n" * 40


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test gets an empty cache folder of its own."""
    monkeypatch.setenv("SMOLL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(tmp_path, text, name="text.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1 << 24])
def test_chunked_encoding_equals_encoding_the_whole_text(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", chunk)
    ids, tokenizer = load_tokens(write(tmp_path, MIXED))
    whole = CharTokenizer.from_text(MIXED)
    assert tokenizer.chars == whole.chars
    assert ids.tolist() == whole.encode(MIXED)


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 24])
def test_line_endings_become_newlines_as_when_python_reads_text(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", chunk)
    text = "Windows\r\nold Mac\rUnix\nnaïve\r\n" * 20 + "\r"
    ids, tokenizer = load_tokens(write(tmp_path, text))
    assert tokenizer.decode(ids.tolist()) == text.replace("\r\n", "\n").replace("\r", "\n")


def test_tiny_shakespeare_keeps_its_vocabulary_and_ids():
    ids, tokenizer = load_tokens(SHAKESPEARE)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    assert tokenizer.vocab_size == 65 and ids.dtype == np.uint8
    assert np.array_equal(ids, CharTokenizer.from_text(text).encode(text))


@pytest.mark.parametrize("min_count", [1, 3])
def test_a_big_text_gets_the_vocabulary_and_ids_of_the_whole_text_from_its_token_file(tmp_path, monkeypatch,
                                                                                    min_count):
    """utils.load_text_ids reads a small text whole and encodes it with CharTokenizer; a text past
    BIG_TEXT_BYTES goes through its token file instead, in pieces: the same vocabulary, the same ids."""
    text = MIXED.replace("\n", "\r\n") + "é" + "üü"  # Windows line endings, and characters seen once and twice
    path = write(tmp_path, text)
    read_whole, whole_tokenizer = load_text_ids(path, min_count)
    assert whole_tokenizer.chars == CharTokenizer.from_text(text.replace("\r\n", "\n"), min_count).chars
    monkeypatch.setattr(utils, "BIG_TEXT_BYTES", 100)  # this text is now a big one
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 7)  # read in pieces that split characters
    from_file, file_tokenizer = load_text_ids(path, min_count)
    assert isinstance(from_file, np.memmap)
    assert file_tokenizer.chars == whole_tokenizer.chars and file_tokenizer.unknown == whole_tokenizer.unknown
    assert np.array_equal(from_file, read_whole)


def test_a_second_load_reads_the_cache_without_encoding(tmp_path, monkeypatch):
    path = write(tmp_path, MIXED)
    first, _ = load_tokens(path)
    monkeypatch.setattr(token_cache, "encode_to_token_file", lambda *a, **k: pytest.fail("encoded twice"))
    second, _ = load_tokens(path)
    assert isinstance(second, np.memmap) and np.array_equal(first, second)


def test_one_changed_character_is_seen_even_with_the_same_size_and_mtime(tmp_path, own_cache):
    path = write(tmp_path, "abcdefgh" * 100)
    ids, _ = load_tokens(path)
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(400)
        f.write(b"z")  # one byte for one byte: the size does not change
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns  # the filesystem kept the old time

    new_ids, tokenizer = load_tokens(path)
    assert "z" in tokenizer.chars and tokenizer.decode(new_ids.tolist())[400] == "z"
    assert len([n for n in os.listdir(own_cache) if n.endswith(".json")]) == 1  # the stale one is gone


@pytest.mark.parametrize("chunk", [7, 64, 1 << 24])
def test_an_id_outside_the_vocabulary_in_the_last_chunk_read_is_seen(tmp_path, monkeypatch, own_cache, chunk,
                                                                      capsys):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]  # uint16 ids: 2 bytes each
    text = "".join(chars) * 3 + "".join(chars[:101])  # 1,001 ids: the last chunk read is a short one
    path = write(tmp_path, text)
    expected, _ = load_tokens(path)
    expected = np.array(expected)
    binary = next(own_cache.glob("*.bin"))
    data = np.fromfile(binary, dtype=np.uint16)
    data[-1] = 305  # the last id; its sampled hash is rewritten to match: only the range check can see it
    data.tofile(binary)
    meta_path = binary.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sample_sha256": token_cache.sample_digest(binary)}))
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", chunk)
    ids, tokenizer = load_tokens(path)
    err = capsys.readouterr().err
    assert "holds the id 305, outside its vocabulary of 300" in err and f"encoding '{path}' again" in err
    assert np.array_equal(ids, expected) and tokenizer.vocab_size == 300


@pytest.mark.parametrize("n_chars, dtype", [(300, np.uint16), (70_000, np.uint32)])
def test_large_vocabularies_get_wide_ids_and_train_and_play(tmp_path, n_chars, dtype, capsys):
    codes = [c for c in range(0x4E00, 0x4E00 + n_chars + 2048) if not 0xD800 <= c < 0xE000][:n_chars]
    chars = [chr(c) for c in codes]
    text = "".join(chars) + "".join(reversed(chars))
    path = write(tmp_path, text)
    ids, tokenizer = load_tokens(path)
    assert ids.dtype == dtype and tokenizer.vocab_size == n_chars
    assert tokenizer.decode(ids.tolist()) == text

    config = make_config(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, max_iters=2,
                         eval_interval=2, eval_iters=1, device="cpu", dtype="float32")
    out = str(tmp_path / "wide.pth")
    train(config, path, out, sample_chars=0)
    play.main(["--weights", out, "--prompt", chars[-1] + chars[0], "--length", "5", "--seed", "0"])
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith(chars[-1] + chars[0]) and len(printed) == 7


def test_rare_characters_become_one_unknown_symbol(tmp_path, own_cache):
    text = "abba cab\n" * 300 + "é" + "üü" + "abc\n" * 20  # é once, ü twice
    path = write(tmp_path, text)
    ids, tokenizer = load_tokens(path, min_count=3)
    assert tokenizer.chars == sorted(set("abc \n") | {UNKNOWN}) and tokenizer.unknown == UNKNOWN
    assert tokenizer.decode(ids.tolist()) == text.replace("é", UNKNOWN).replace("ü", UNKNOWN)
    _, whole = load_tokens(path)  # the whole vocabulary's token file stays cached beside it
    assert {"é", "ü"} <= set(whole.chars) and whole.unknown is None
    assert len([n for n in os.listdir(own_cache) if n.endswith(".json")]) == 2


def test_a_model_with_an_unknown_symbol_trains_and_plays_characters_it_never_saw(tmp_path, tiny_config,
                                                                                 tiny_text, capsys):
    config = make_config(**{**vars(tiny_config), "min_char_count": 50, "max_iters": 2})
    out = str(tmp_path / "unk.pth")
    train(config, tiny_text, out, sample_chars=0)
    model, tokenizer, _ = utils.load_model(out)
    # In the first 20,000 characters J occurs twice and e thousands of times; ß never.
    assert UNKNOWN in tokenizer.chars and "J" not in tokenizer.chars and "e" in tokenizer.chars
    capsys.readouterr()
    play.main(["--weights", out, "--prompt", "Jeß", "--length", "5", "--seed", "0"])
    assert capsys.readouterr().out.startswith("Jeß")  # the prompt is echoed as typed


def test_the_evenly_spread_evaluation_sample_is_the_same_in_every_run():
    n_ids, block, limit = 1_000_001, 64, 8192
    starts, tail = eval_chunks(n_ids, block, limit)
    again, _ = eval_chunks(n_ids, block, limit)
    assert np.array_equal(starts, again) and tail == 0
    assert len(starts) == limit // block
    assert starts[0] == 0 and starts[-1] == n_ids - 1 - block  # from the first target to the last
    gaps = np.diff(starts)
    assert gaps.min() >= block and gaps.max() - gaps.min() <= 1  # even, and no window overlaps

    small_starts, small_tail = eval_chunks(1003, 7, limit)  # a small split is scored whole
    assert np.array_equal(small_starts, np.arange(143) * 7) and small_tail == 1


def test_a_large_split_is_scored_on_the_sample_unless_asked_for_all():
    model = torch.nn.Module()
    model.forward = lambda x, y: (None, torch.tensor(float(x.float().mean())))  # a stand-in "loss"
    data = np.arange(100_001) % 50
    _, n_sampled = eval_loss(model, data, 16, max_chars=1600)
    _, n_all = eval_loss(model, data, 16, max_chars=None)
    assert (n_sampled, n_all) == (1600, 100_000)


def test_a_text_is_renumbered_into_a_larger_model_vocabulary(tmp_path):
    ids, text_tokenizer = load_tokens(write(tmp_path, "abcab"))
    model_tokenizer = CharTokenizer.from_text("_abcdef")
    assert to_model_ids(ids, text_tokenizer, model_tokenizer, "t").tolist() == model_tokenizer.encode("abcab")
    with pytest.raises(SmollError, match="never saw"):
        to_model_ids(ids, text_tokenizer, CharTokenizer.from_text("ab"), "t")


def test_a_read_only_data_folder_falls_back_to_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SMOLL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    path = write(tmp_path, MIXED)
    real_temp_file = token_cache.temp_file

    def read_only_beside(folder, suffix):
        if folder == str(tmp_path / ".smoll_cache"):
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_temp_file(folder, suffix)

    monkeypatch.setattr(token_cache, "temp_file", read_only_beside)
    ids, tokenizer = load_tokens(path)
    assert tokenizer.decode(ids.tolist()) == MIXED
    assert len(os.listdir(tmp_path / "home" / "smoll")) == 2  # NAME.HASH.bin and NAME.HASH.json
    assert os.listdir(tmp_path / ".smoll_cache") == []


# Bad input: one sentence that names the fix, and no cache file left behind.


def test_invalid_utf8_deep_in_the_text_names_its_byte_offset(tmp_path, monkeypatch, own_cache):
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 1000)
    path = tmp_path / "bad.txt"
    good = MIXED.encode("utf-8")
    path.write_bytes(good + b"\xff" + good)
    with pytest.raises(SmollError, match=f"0xff at offset {len(good):,} is not valid UTF-8.*iconv"):
        load_tokens(str(path))
    assert not os.path.exists(own_cache) or os.listdir(own_cache) == []
    path.write_bytes(good + "é".encode("utf-8")[:1])  # a character cut short by the end of the file
    with pytest.raises(SmollError, match=f"at offset {len(good):,}"):
        load_tokens(str(path))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to stand in for a full disk")
def test_a_full_disk_while_writing_the_token_file(tmp_path, monkeypatch, own_cache):
    real_temp_file = token_cache.temp_file

    def full_disk(folder, suffix):
        fd, tmp = real_temp_file(folder, suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp  # every write fails with ENOSPC

    monkeypatch.setattr(token_cache, "temp_file", full_disk)
    with pytest.raises(SmollError, match="disk is full.*SMOLL_CACHE"):
        load_tokens(write(tmp_path, MIXED * 100))
    assert os.listdir(own_cache) == []


def test_a_text_that_changes_while_it_is_encoded(tmp_path, monkeypatch, own_cache):
    monkeypatch.setattr(token_cache, "CHUNK_BYTES", 256)
    path = write(tmp_path, MIXED)
    real_code_points = token_cache._code_points

    def someone_writes_meanwhile(text_path, bar, digest=None):
        for i, codes in enumerate(real_code_points(text_path, bar, digest)):
            if digest is not None and i == 0:  # the encoding pass has started
                with open(text_path, "r+b") as f:
                    f.seek(-2, os.SEEK_END)
                    f.write(b"?\n")
            yield codes

    monkeypatch.setattr(token_cache, "_code_points", someone_writes_meanwhile)
    with pytest.raises(SmollError, match="changed while it was being encoded: run again"):
        load_tokens(path)
    assert os.listdir(own_cache) == []


def test_a_text_whose_validation_split_is_too_short(tmp_path, tiny_config):
    with pytest.raises(SmollError, match="too short for block_size 16.*at least 170 characters"):
        train(tiny_config, write(tmp_path, "just a few words, far too few\n"), str(tmp_path / "x.pth"))
