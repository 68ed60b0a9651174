"""Shared fixtures. Run the suite from the repository root with `python -m pytest`."""

import os
import signal
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import make_config  # noqa: E402
from smoll.data import load_token_file  # noqa: E402
from utils import UNKNOWN, CharTokenizer  # noqa: E402

SHAKESPEARE = os.path.join(ROOT, "dataset", "tinyshakespeare.txt")

# play.py and train.py cache their timings (and token files of read-only folders) in the user's
# cache folder: keep the suite's, and its subprocesses', apart from the user's own ~/.cache/smoll.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="smoll-test-cache-")
# A first run builds its compiled decoding step in a background process: not in the suite, where
# every run is a first run. The tests that build or load packages say so.
os.environ["SMOLL_BACKGROUND_BUILD"] = "0"


def load_tokens(path, min_count=1):
    """A text's token file (smoll/data.py), whatever its size, with its vocabulary as a tokenizer:
    what utils.load_text_ids returns for a text past BIG_TEXT_BYTES."""
    ids, chars = load_token_file(path, min_count=min_count, unknown=UNKNOWN)
    return ids, CharTokenizer(chars, UNKNOWN if min_count > 1 else None)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium, for the explorer's page (skipped without them)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-background-networking", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def listen_to_ctrl_c():
    """For subprocesses that a test stops with SIGINT: a shell's background job (`cmd &`, nohup)
    starts its children with SIGINT ignored, and train.py then rightly keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def shakespeare():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def tiny_config():
    """A TinyGPT small enough to train for a few steps in well under a second."""
    return make_config(n_layer=2, n_embd=32, n_head=4, block_size=16, batch_size=8, dropout=0.0,
                       max_iters=20, eval_interval=10, eval_iters=2, device="cpu", dtype="float32")


@pytest.fixture
def tiny_text(tmp_path, shakespeare):
    """The first 20,000 characters of Tiny Shakespeare, as a file."""
    path = tmp_path / "tiny.txt"
    path.write_text(shakespeare[:20_000], encoding="utf-8")
    return str(path)
