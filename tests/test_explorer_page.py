"""The explorer's page in a real browser, served by `python play.py --web --port 0` as a user starts it:
no console error, the head "all" map, the Bigram's page, a phone-wide window, the keyboard and the
text alternatives. Needs Debian's chromium and chromium-driver and the selenium package; without them
it is skipped. Run with `python -m pytest tests/test_explorer_page.py`."""

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT



def wait_for(condition, seconds=30, what="the page"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"waited {seconds} s in vain for {what}")


class Server:
    """`play.py --web --port 0` (and flags), started from the repository root as a user starts it, with
    its own cache folder. float32: the page does not care, and it spares the start-up timing of dtypes."""

    def __init__(self, folder, *flags):
        self.flags, self.errors = flags, open(folder / "stderr.txt", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "play.py", "--web", "--port", "0", "--dtype", "float32", *flags], cwd=ROOT,
            env=dict(os.environ, XDG_CACHE_HOME=str(folder / "cache")), stdout=subprocess.PIPE, stderr=self.errors,
            text=True)

    def url(self):
        """The URL it prints once it listens (a failure with its stderr if it prints something else)."""
        lines = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=90)
        line = lines[0] if lines else ""
        if "http://127.0.0.1:" not in line:
            self.stop()
            with open(self.errors.name) as f:
                pytest.fail(f"play.py --web {' '.join(self.flags)} printed {line!r}, not its URL; stderr: "
                            f"{f.read()[-2000:]}")
        return "http://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split("/")[0] + "/"

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.errors.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The shipped TinyGPT's explorer and the Bigram's, started together: their start-ups overlap."""
    started = {name: Server(tmp_path_factory.mktemp(name), *flags)
               for name, flags in (("tinygpt", ()), ("bigram", ("--model", "bigram")))}
    try:
        yield {name: server.url() for name, server in started.items()}
    finally:
        for server in started.values():
            if server.process.poll() is None:
                server.stop()


@pytest.fixture(scope="module")
def tinygpt(servers):
    return servers["tinygpt"]


@pytest.fixture(scope="module")
def bigram(servers):
    return servers["bigram"]


def find(driver, part):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, part)


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def open_page(driver, url, attention=True):
    """Load the page and wait until its bars (and its attention map, where the model has one) are drawn."""
    driver.get(url)
    wait_for(lambda: find(driver, "candidates").get_attribute("data-drawn"), what="the next-character bars")
    if attention:
        wait_for(lambda: find(driver, "heatmap").get_attribute("data-shows"), what="the attention map")


def choose_head(driver, value):
    from selenium.webdriver.support.ui import Select
    Select(find(driver, "head")).select_by_value(value)


def severe(entries):
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]


def test_loading_the_page_and_generating_log_no_console_error(browser, tinygpt):
    severe(browser.get_log("browser"))  # whatever came before this test
    open_page(browser, tinygpt)
    time.sleep(0.5)  # the icon's request and the first refresh have settled
    assert severe(browser.get_log("browser")) == []
    find(browser, "length").clear()
    find(browser, "length").send_keys("40")
    find(browser, "seed").send_keys("5")
    find(browser, "generate").click()
    wait_for(lambda: "40 characters written" in find(browser, "status").text, what="the generation's end")
    output = js(browser, "return document.getElementById('output').textContent")
    assert output.startswith("ROMEO:") and len(output) == len("ROMEO:") + 40
    wait_for(lambda: find(browser, "heatmap").get_attribute("data-drawn") == str(len(output)),
             what="the map of the generated text")
    assert "the generated text" in find(browser, "bars-source").text  # a bar's click takes all of it
    find(browser, "length").clear()
    find(browser, "length").send_keys("20000")
    find(browser, "generate").click()  # and one stopped halfway
    wait_for(lambda: len(find(browser, "output").text) > 60, what="text to stream")
    find(browser, "stop").click()
    wait_for(lambda: "stopped after" in find(browser, "status").text, what="the stop")
    time.sleep(0.5)
    assert severe(browser.get_log("browser")) == []


def test_head_all_draws_the_mean_of_the_heads_and_says_so(browser, tinygpt):
    open_page(browser, tinygpt)
    shows = lambda: find(browser, "heatmap").get_attribute("data-shows")  # noqa: E731
    pixels = lambda: js(browser, "return document.getElementById('heatmap').toDataURL()")  # noqa: E731
    assert wait_for(lambda: shows() == "layer 1, head 1")
    first = pixels()
    choose_head(browser, "all")
    wait_for(lambda: "mean" in shows(), what="the map of all heads")
    assert shows() == "layer 1, the mean of its 6 heads"
    assert pixels() != first
    assert "mean of its 6 heads" in find(browser, "heatmap").get_attribute("aria-label")
    assert "mean" in find(browser, "heatmap-caption").text
    assert len(find(browser, "looks-at").find_elements("css selector", "div")) == 6  # a line per head
    choose_head(browser, "1")  # head 2 alone differs from head 1 too: the menu is read
    wait_for(lambda: shows() == "layer 1, head 2")
    assert pixels() != first


def test_the_bigram_page_hides_the_attention_controls_and_says_why(browser, bigram):
    open_page(browser, bigram, attention=False)
    for part in ("layer", "head", "heatmap", "looks-at"):
        assert not find(browser, part).is_displayed(), part
    why = find(browser, "attention-none")
    assert why.is_displayed() and "no attention" in why.text
    assert not find(browser, "compare").is_displayed()  # no second model: no empty chart either
    assert "--compare" in find(browser, "compare-hint").text


@pytest.mark.parametrize("width", [390, 800])
def test_a_narrow_window_does_not_scroll_sideways(browser, tinygpt, width):
    # Headless Chromium keeps windows at least 500 px wide: a narrower one is emulated.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": 844, "deviceScaleFactor": 1, "mobile": False})
    try:
        open_page(browser, tinygpt)
        choose_head(browser, "all")  # the widest attention view: a line per head
        wait_for(lambda: "mean" in find(browser, "heatmap").get_attribute("data-shows"))
        scroll, inner = js(browser, "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert inner == width and scroll <= inner
        box = js(browser, "return document.getElementById('candidates').getBoundingClientRect().right")
        assert box <= inner  # the bars fit, instead of being squeezed off the side
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_bars_answer_the_keyboard_and_everything_has_a_name(browser, tinygpt):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    open_page(browser, tinygpt)
    assert js(browser, "return [...document.getElementById('prompt').labels].map(l => l.textContent.trim())") == \
        ["Prompt"]
    for canvas in ("candidates", "heatmap", "compare"):
        element = find(browser, canvas)
        assert element.get_attribute("role") == "img"
        assert len(element.get_attribute("aria-label")) > 40 and "loading" not in element.get_attribute("aria-label")
    first = find(browser, "candidates").get_attribute("data-drawn")[0]
    assert f"“{first}”" in find(browser, "candidates").get_attribute("aria-label") or first in " \n"

    find(browser, "prompt").click()  # then Tab, as someone without a mouse goes down the page
    on_a_bar = "return document.activeElement.parentElement.id === 'candidates-keys'"
    for presses in range(12):
        if js(browser, on_a_bar):
            break
        ActionChains(browser).send_keys(Keys.TAB).perform()
    assert js(browser, on_a_bar), "Tab never reached the bars"
    assert js(browser, "return document.activeElement.matches(':focus-visible') && "
                       "getComputedStyle(document.activeElement).outlineStyle !== 'none'")  # a visible focus
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()  # the second bar
    second = find(browser, "candidates").get_attribute("data-drawn")[1]
    assert js(browser, "return document.activeElement.dataset.char") == second
    assert "add" in js(browser, "return document.activeElement.getAttribute('aria-label')")
    before = js(browser, "return document.getElementById('prompt').value")
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    assert find(browser, "prompt").get_attribute("value") == before + second
    wait_for(lambda: find(browser, "candidates").get_attribute("data-drawn") != "" and
             js(browser, "return document.getElementById('bars-source').textContent.includes("
                         f"'({len(before) + 1} characters)')"), what="the bars of the longer prompt")
    assert js(browser, on_a_bar)  # the focus stays on the bars for the next character
