"""The explorer, `python play.py --web`: its JSON API, its stream, its refusals, and a real browser
driving its page. Run with `python -m pytest tests/test_explorer.py`. The browser test needs
Debian's chromium and chromium-driver and the selenium package; without them it is skipped."""

import contextlib
import http.client
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import smoll.explorer.server as explorer_server
import play
from conftest import ROOT
from models import filter_logits
from smoll.sampling.decoder import Decoder, Variant, prepare
from utils import SHIPPED_WEIGHTS, load_model

PROMPT = "ROMEO:"


def start(explorer, handler=None, host="127.0.0.1"):
    server = explorer_server.make_server(explorer, host, 0)
    if handler is not None:
        server.RequestHandlerClass = type("Handler", (handler, server.RequestHandlerClass), {})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture(scope="module")
def shipped():
    """The shipped TinyGPT in float32 with its decoder, as `play.py --dtype float32` samples."""
    model, tokenizer, config = load_model(SHIPPED_WEIGHTS["tinygpt"])
    model, decoder = prepare(model, Variant("float32"), torch.device("cpu"))
    bigram = load_model(SHIPPED_WEIGHTS["bigram"])[0]
    return explorer_server.Explorer(model, decoder, tokenizer, config, torch.device("cpu"), compare=("bigram", bigram))


@pytest.fixture(scope="module")
def server(shipped):
    server, port = start(shipped)
    yield port
    server.shutdown()


def request(port, method, path, body=None, headers=None, raw=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    content = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type"), content


def post(port, path, body, **kwargs):
    status, kind, content = request(port, "POST", path, body, **kwargs)
    return status, json.loads(content) if kind.startswith("application/json") else content.decode()


def events(stream_text):
    """The characters of a text/event-stream answer, and whether it ended with `event: done`."""
    chars, done = [], False
    for event in stream_text.split("\n\n"):
        if event.startswith("event: done"):
            done = True
        elif event.startswith("data: "):
            chars.append(json.loads(event[6:])["text"])
    return "".join(chars), done


def test_the_page_loads_with_its_parts(server):
    status, kind, page = request(server, "GET", "/")
    assert status == 200 and kind.startswith("text/html")
    for part in ("prompt", "generate", "stop", "output", "candidates", "attention"):
        assert f'id="{part}"' in page.decode()
    assert "http://" not in page.decode().replace("http://127.0.0.1", "")  # no CDN, no other site


def test_next_gives_the_models_softmax_before_and_after_the_settings(server, shipped):
    settings = {"temperature": 0.7, "top_k": 10, "top_p": 0.9}
    status, answer = post(server, "/api/next", {"text": PROMPT, **settings})
    assert status == 200
    ids = torch.tensor([shipped.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        logits = shipped.model(ids)[0][:, -1].float()
    raw = torch.softmax(logits, -1)[0]
    after = torch.softmax(filter_logits(logits, 0.7, 10, 0.9), -1)[0]
    chars = shipped.tokenizer.chars
    probs = [c["prob"] for c in answer["candidates"]]
    assert probs == sorted(probs, reverse=True) and len(probs) == explorer_server.CANDIDATES
    for c in answer["candidates"]:
        i = chars.index(c["char"])
        assert c["raw_prob"] == pytest.approx(raw[i].item(), abs=2e-6)
        assert c["prob"] == pytest.approx(after[i].item(), abs=2e-6)
    assert sum(c["prob"] for c in answer["candidates"]) == pytest.approx(1, abs=1e-5)  # top_k 10 < 20
    torch.testing.assert_close(torch.tensor(answer["logits"]), logits[0], atol=1e-4, rtol=0)
    assert answer["compare"]["name"] == "bigram" and len(answer["compare"]["candidates"]) == explorer_server.CANDIDATES


def test_attention_answers_the_maps_play_draws(server, shipped):
    status, answer = post(server, "/api/attention", {"text": PROMPT, "layer": 2, "head": 4})
    assert status == 200 and answer["chars"] == list(PROMPT)
    maps = shipped.model.attention_maps(torch.tensor([shipped.tokenizer.encode(PROMPT)]))
    torch.testing.assert_close(torch.tensor(answer["map"]), maps[2, 4], atol=1e-4, rtol=0)
    last = torch.tensor(answer["last"])  # (layers, heads, T): what the last character looks at
    assert last.shape == (6, 6, len(PROMPT)) and torch.allclose(last.sum(-1), torch.ones(6, 6), atol=1e-3)


def test_generate_streams_the_text_play_py_writes_for_the_seed(server, capsys):
    play.main(["--prompt", PROMPT, "--length", "120", "--seed", "11", "--dtype", "float32", "--temperature", "0.9",
               "--top_k", "30"])
    expected = capsys.readouterr().out.rstrip("\n")
    status, answer = post(server, "/api/generate", {"prompt": PROMPT, "length": 120, "seed": 11,
                                                      "temperature": 0.9, "top_k": 30})
    text, done = events(answer)
    assert status == 200 and done and PROMPT + text == expected


@pytest.mark.parametrize("path, body, raw, headers, status, said", [
    ("/api/next", {"text": "ROMEO: ç and ü"}, None, {}, 400, "never saw: \"ç\" \"ü\""),
    ("/api/generate", {"length": 10 ** 6}, None, {}, 400, "'length' must be between 0 and 20000"),
    ("/api/generate", {"length": "40"}, None, {}, 400, "'length' must be an integer"),
    ("/api/next", {"text": 5}, None, {}, 400, "'text' must be a string"),
    ("/api/next", {"text": "a", "temperature": True}, None, {}, 400, "'temperature' must be a number"),
    ("/api/next", {"text": "a", "top_p": 0}, None, {}, 400, "'top_p' must be above 0"),
    ("/api/attention", {"text": "a", "layer": 6}, None, {}, 400, "'layer' must be between 0 and 5"),
    ("/api/next", None, b"{not json", {}, 400, "not JSON"),
    ("/api/next", None, b"[1, 2]", {}, 400, "must be a JSON object"),
    ("/api/next", None, b"x" * (explorer_server.MAX_BODY + 1), {}, 413, "at most 65,536 are read"),
    ("/api/next", {"text": "a"}, None, {"Host": "evil.example:80"}, 403, "only answers to the addresses it prints, "
                                                                        "such as 127.0.0.1:"),
    ("/api/next", {"text": "a"}, None, {"Origin": "http://evil.example"}, 403, "other sites are refused"),
    ("/api/secrets", {}, None, {}, 404, "no API at /api/secrets"),
])
def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, path, body, raw, headers, status,
                                                                    said):
    got, answer = post(server, path, body, raw=raw, headers=headers)
    assert got == status and said in answer["error"]
    assert request(server, "GET", "/api/info")[0] == 200


def test_a_request_without_a_length_is_refused(server):
    connection = socket.create_connection(("127.0.0.1", server))
    connection.sendall(f"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\n\r\n".encode())
    assert b" 411 " in connection.recv(4096).split(b"\r\n")[0]
    connection.close()


def test_a_client_that_goes_away_stops_its_generation(shipped):
    written = []

    class Counting:
        def stream(self, characters):
            def counted():
                for text in characters:
                    written.append(text)
                    yield text
            super().stream(counted())

    server, port = start(shipped, Counting)
    connection = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": PROMPT, "length": 20000}).encode()
    connection.sendall(f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    connection.recv(4096)
    connection.close()  # the Stop button, or a closed tab
    deadline = time.time() + 30
    while time.time() < deadline:
        seen = len(written)
        time.sleep(0.5)
        if len(written) == seen:
            break
    assert len(written) < 20000 and len(written) == seen
    assert shipped.lock.acquire(timeout=5)  # the model is free again
    shipped.lock.release()
    server.shutdown()


def test_several_browsers_at_once_each_get_their_own_text(server):
    results = {}

    def one(seed):
        results[seed] = events(post(server, "/api/generate", {"prompt": PROMPT, "length": 150, "seed": seed})[1])

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2, 1)]
    for t in threads:
        t.start()
    status, answer = post(server, "/api/next", {"text": PROMPT})  # answered while they stream
    for t in threads:
        t.join()
    assert status == 200 and all(done for _, done in results.values())
    alone = events(post(server, "/api/generate", {"prompt": PROMPT, "length": 150, "seed": 2})[1])
    assert results[2] == alone  # interleaved with others, a seed still gives its own text


def test_play_web_prints_its_url_and_serves(tmp_path):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "play.py"), "--web", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert request(port, "GET", "/")[0] == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_favicon_is_no_content_so_browsers_log_no_error(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    connection.request("GET", "/favicon.ico")
    response = connection.getresponse()
    assert response.status == 204 and response.read() == b""
    assert response.getheader("Cache-Control") == "max-age=86400"
    connection.close()


def other_machines_address():
    """A non-loopback address of this machine, found as the server finds them (IPv4 first), or a skip."""
    addresses = []
    for name in explorer_server.own_addresses():
        with contextlib.suppress(ValueError):  # a name, not an address
            if explorer_server.reachable_from_elsewhere(name):
                addresses.append(ipaddress.ip_address(name))
    if not addresses:
        pytest.skip("this machine has no network address but its loopback one")
    address = min(addresses, key=lambda a: (a.version, str(a)))
    return f"[{address}]" if address.version == 6 else str(address)


@pytest.fixture(scope="module")
def everywhere(shipped):
    """The explorer on every interface, as `--host 0.0.0.0` serves it; the tests still only talk to 127.0.0.1."""
    server, port = start(shipped, host="0.0.0.0")
    yield port
    server.shutdown()


def test_on_every_interface_it_answers_to_this_machines_own_address(everywhere):
    address = other_machines_address()
    status, kind, page = request(everywhere, "GET", "/", headers={"Host": f"{address}:{everywhere}"})
    assert status == 200 and kind.startswith("text/html")
    status, answer = post(everywhere, "/api/next", {"text": PROMPT}, headers={
        "Host": f"{address}:{everywhere}", "Origin": f"http://{address}:{everywhere}"})
    assert status == 200 and answer["candidates"]


@pytest.mark.parametrize("headers, said", [
    ({"Host": "evil.example:{port}"}, "only answers to the addresses it prints"),
    ({"Origin": "http://evil.example:{port}"}, "requests from other sites are refused"),
])
def test_on_every_interface_another_site_is_still_refused(everywhere, headers, said):
    headers = {name: value.format(port=everywhere) for name, value in headers.items()}
    status, answer = post(everywhere, "/api/next", {"text": PROMPT}, headers=headers)
    assert status == 403 and said in answer["error"]
    status, kind, content = request(everywhere, "GET", "/", headers=headers)
    assert status == 403


def serve_once(shipped, monkeypatch, *flags):
    """play.py --web's start-up with a real server that returns at once: (stdout, stderr)."""
    real = explorer_server.make_server

    def once(*args):
        server = real(*args)
        server.serve_forever = lambda: None
        return server

    monkeypatch.setattr(explorer_server, "make_server", once)
    args = play.build_parser().parse_args(["--web", "--port", "0", *flags])
    explorer_server.serve(args, shipped.model, shipped.decoder, shipped.tokenizer, shipped.config, shipped.device)


def test_another_host_than_this_machine_is_warned_about_and_its_urls_printed(shipped, monkeypatch, capsys):
    serve_once(shipped, monkeypatch, "--host", "0.0.0.0")
    captured = capsys.readouterr()
    assert "warning: --host 0.0.0.0 lets other machines" in captured.err
    assert "an SSH tunnel to the default --host 127.0.0.1 is the safer way" in captured.err
    lines = captured.out.splitlines()
    assert "http://127.0.0.1:" in lines[0] and "(Ctrl-C stops it)" in lines[0]
    port = lines[0].split("http://127.0.0.1:")[1].split("/")[0]
    others = [name for name in explorer_server.own_addresses() if explorer_server.reachable_from_elsewhere(name)]
    if others:
        assert lines[1].startswith("from other machines: ")
        for name in others:
            assert explorer_server.url(name, port) in lines[1].split()
        assert "127.0.0.1" not in lines[1] and "localhost" not in lines[1]
    else:
        assert len(lines) == 1


def test_the_default_host_prints_only_its_loopback_url_and_no_warning(shipped, monkeypatch, capsys):
    serve_once(shipped, monkeypatch)
    captured = capsys.readouterr()
    assert captured.err == "" and len(captured.out.splitlines()) == 1 and "http://127.0.0.1:" in captured.out


def test_a_host_this_machine_does_not_have_is_a_clear_error(shipped, monkeypatch):
    with pytest.raises(explorer_server.SmollError, match="pass an address or name of this machine"):
        serve_once(shipped, monkeypatch, "--host", "no-such-host.invalid")


# ----------------------------------------------------------------------------------------------
# A real browser


def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-background-networking", "--window-size=1400,1350"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(condition, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError("waited in vain")


def test_a_browser_generates_watches_the_candidates_and_attention_and_stops(server, tmp_path):
    from selenium.webdriver.common.by import By
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{server}/")
        find = lambda part: driver.find_element(By.ID, part)  # noqa: E731
        wait_for(lambda: find("candidates").get_attribute("data-drawn"))
        prompt = find("prompt")
        prompt.clear()
        prompt.send_keys("JULIET:")
        find("length").clear()
        find("length").send_keys("20000")
        find("generate").click()
        wait_for(lambda: len(find("output").text) > 60)  # the text grows as it streams
        grown = len(find("output").text)
        wait_for(lambda: len(find("output").text) > grown)
        find("stop").click()
        wait_for(lambda: "stopped after" in find("status").text)
        output = lambda: driver.execute_script("return document.getElementById('output').textContent")  # noqa: E731
        stopped_at = len(output())
        time.sleep(1)
        assert len(output()) == stopped_at < 20000 and output().startswith("JULIET:")
        drawn = wait_for(lambda: find("candidates").get_attribute("data-drawn"))
        assert len(drawn) == explorer_server.CANDIDATES
        window = min(128, stopped_at)  # the attention covers the last window of the text
        assert wait_for(lambda: find("heatmap").get_attribute("data-drawn") == str(window))
        assert len(find("looks-at").find_elements(By.TAG_NAME, "span")) == window
        # A slider redraws from the same logits; a click on the likeliest bar appends its character.
        driver.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                              "t.dispatchEvent(new Event('input'));")
        assert "greedy" in find("temperature-value").text
        text_before = driver.execute_script("return current")
        first = find("candidates").get_attribute("data-drawn")[0]
        driver.execute_script("const c = document.getElementById('candidates'), r = c.getBoundingClientRect();"
                              "c.dispatchEvent(new MouseEvent('click', {clientX: r.left + 2, clientY: r.top + 50}));")
        assert find("prompt").get_attribute("value") == text_before + first
        driver.save_screenshot(str(tmp_path / "explorer.png"))
    finally:
        driver.quit()


class ByteByByte:
    """Sends every event one byte at a time, so the page's reads split events and characters."""

    def write_event(self, data):
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(0.001)


class BreaksOff:
    """Hangs up after five characters, without the closing event."""

    sent = 0

    def write_event(self, data):
        super().write_event(data)
        BreaksOff.sent += 1
        if BreaksOff.sent == 5:
            self.connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionResetError


@pytest.fixture(scope="module")
def many_alphabets(tmp_path_factory):
    """A small TinyGPT trained on text of 1- to 4-byte UTF-8 characters (CJK, emoji)."""
    from config import make_config
    from train import train
    folder = tmp_path_factory.mktemp("alphabets")
    text = folder / "mixed.txt"
    text.write_text("To be, or not: café, naïve, Ελληνικά, 日本語の文章, emoji 🎭🐍!\n" * 200, encoding="utf-8")
    train(make_config(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=8, max_iters=30, eval_interval=30,
                      eval_iters=2, device="cpu", dtype="float32"), str(text), str(folder / "m.pth"), sample_chars=0)
    model, tokenizer, config = load_model(str(folder / "m.pth"))
    return explorer_server.Explorer(model, Decoder(model), tokenizer, config, torch.device("cpu"))


def test_the_page_puts_together_events_and_characters_split_across_reads_and_shows_a_broken_stream(many_alphabets):
    from selenium.webdriver.common.by import By
    plain, port = start(many_alphabets)
    body = {"prompt": "日本", "length": 40, "seed": 3, "temperature": 1.5}
    expected, done = events(post(port, "/api/generate", body)[1])
    assert done and any(len(ch.encode()) > 2 for ch in expected)  # 3- and 4-byte characters to split
    split, split_port = start(many_alphabets, ByteByByte)
    BreaksOff.sent = 0
    broken, broken_port = start(many_alphabets, BreaksOff)
    driver = browser()
    try:
        for which, at in (("split", split_port), ("broken", broken_port)):
            driver.get(f"http://127.0.0.1:{at}/")
            find = lambda part: driver.find_element(By.ID, part)  # noqa: E731
            wait_for(lambda: find("candidates").get_attribute("data-drawn"))
            driver.execute_script(f"document.getElementById('temperature').value = {body['temperature']};")
            find("prompt").clear()
            find("prompt").send_keys(body["prompt"])
            find("seed").send_keys(str(body["seed"]))
            find("length").clear()
            find("length").send_keys(str(body["length"]))
            find("generate").click()
            if which == "split":
                wait_for(lambda: "characters written" in find("status").text, seconds=60)
                assert driver.execute_script("return document.getElementById('output').textContent") == \
                    body["prompt"] + expected
            else:
                wait_for(lambda: "generation failed" in find("status").text)
                assert "the stream broke off before its end" in find("status").text
                assert driver.execute_script("return document.getElementById('output').textContent") == \
                    body["prompt"] + expected[:5]  # the five characters before the break stay
    finally:
        driver.quit()
        for s in (plain, split, broken):
            s.shutdown()


def test_a_browser_that_leaves_before_its_answer_prints_no_traceback(shipped, capsys):
    server = explorer_server.make_server(shipped, "127.0.0.1", 0)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise error
            except OSError:
                server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a real bug")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a real bug" in capsys.readouterr().err  # other errors still show
    finally:
        server.server_close()
