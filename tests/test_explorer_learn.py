"""The explorer's Learn, Layers and Characters panels: the logit lens and the map checked in math,
training runs started, watched and stopped through the API (with hostile requests), and the whole
flow in headless Chromium: train for 15 s from the page, watch it learn, stop, explore the new model.
Run with `python -m pytest tests/test_explorer_learn.py`."""

import http.client
import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smoll.explorer.server as explorer_server
from config import make_config
from conftest import ROOT, SHAKESPEARE
from models import Bigram, TinyGPT
from smoll.explorer import learn
from smoll.explorer.learn import Learner
from smoll.explorer.views import character_kind, character_map, logit_lens
from smoll.sampling.decoder import Variant, prepare
from test_explorer_page import Server, wait_for
from utils import SHIPPED_WEIGHTS, load_model


# ----------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("weights", ["shipped", "random"])
def test_the_logit_lens_last_layer_is_the_models_own_prediction(weights):
    if weights == "shipped":
        model, tokenizer, _ = load_model(SHIPPED_WEIGHTS["tinygpt"])
        idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    else:
        torch.manual_seed(0)
        model = TinyGPT(make_config(n_layer=3, n_embd=32, n_head=4, block_size=16, qk_norm=True, logit_cap=30.0), 20).eval()
        idx = torch.randint(20, (1, 12))
    lens = logit_lens(model, idx)
    assert lens.shape == (len(model.blocks), model.lm_head.out_features)
    torch.testing.assert_close(lens.sum(-1), torch.ones(len(model.blocks)))
    with torch.no_grad():
        own = F.softmax(model(idx)[0][0, -1], dim=-1)
    torch.testing.assert_close(lens[-1], own, rtol=1e-5, atol=1e-6)
    if weights == "shipped":  # a trained model's first layer guesses otherwise: the guess forms on the way
        assert lens[0].argmax() != own.argmax() or (lens[0] - own).abs().max() > 0.1


def test_the_bigram_lens_is_its_table_row():
    torch.manual_seed(0)
    model = Bigram(make_config(model="bigram"), 10)
    idx = torch.tensor([[3, 1, 4]])
    torch.testing.assert_close(logit_lens(model, idx)[0], F.softmax(model.token_embedding_table.weight[4], -1))


@pytest.mark.parametrize("which", ["tinygpt", "bigram"])
def test_the_characters_map_is_the_pca_of_the_embeddings(which):
    model, tokenizer, _ = load_model(SHIPPED_WEIGHTS[which])
    points, explained = character_map(model, tokenizer)
    table = (model.token_embedding if which == "tinygpt" else model.token_embedding_table).weight.detach().numpy()
    centred = table - table.mean(axis=0)
    _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    expected = centred @ vt[:2].T  # (V, 2): numpy's own projection
    got = np.array([[p["x"], p["y"]] for p in points])
    for axis in range(2):  # a singular vector is defined up to its sign
        sign = np.sign(expected[:, axis] @ got[:, axis])
        np.testing.assert_allclose(sign * got[:, axis], expected[:, axis], atol=1e-4)
    np.testing.assert_allclose(explained, (s[:2] ** 2 / (s ** 2).sum()), atol=1e-5)
    assert [p["char"] for p in points] == tokenizer.chars


def test_each_character_has_a_kind():
    assert [character_kind(c) for c in "aZx.B \n7"] == ["vowel", "uppercase", "lowercase", "punctuation",
                                                          "uppercase", "space", "space", "digit"]
    assert character_kind("E") == "vowel" and character_kind("é") == "lowercase"


# ----------------------------------------------------------------------------------------------
# The API, with a real train.py run behind it


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The explorer's server over the shipped TinyGPT, whose Learn panel trains on Tiny Shakespeare
    into a folder of this test's own. Yields a function that sends a request and returns (status,
    answer)."""
    monkeypatch.setattr(learn, "OUT_FOLDER", str(tmp_path / "out"))
    model, tokenizer, config = load_model(SHIPPED_WEIGHTS["tinygpt"])
    model, decoder = prepare(model, Variant("float32"), torch.device("cpu"))
    learner = Learner({"shakespeare": SHAKESPEARE})
    explorer = explorer_server.Explorer(model, decoder, tokenizer, config, torch.device("cpu"),
                                        learner=learner, name="models/tinygpt.pth")
    server = explorer_server.make_server(explorer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def request(path, body=None, raw=None):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        data = raw if raw is not None else None if body is None else json.dumps(body)
        connection.request("GET" if data is None else "POST", path, body=data,
                           headers={"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        return response.status, answer

    request.port = port
    yield request
    learner.close()
    server.shutdown()
    server.server_close()


def wait_until_done(api, seconds=120):
    return wait_for(lambda: (s := api("/api/learn")[1])["state"] not in ("training", "stopping") and s, seconds,
                    "the run to end")


@pytest.mark.parametrize("body, said", [
    ('{"model": "tinygpt", "seconds": NaN}', "not JSON"),
    ({"model": "tinygpt", "seconds": -1}, "'seconds' must be a number from 10 to 600"),
    ({"model": "tinygpt", "seconds": 1e9}, "'seconds' must be a number from 10 to 600"),
    ({"model": "tinygpt", "seconds": "30"}, "'seconds' must be a number from 10 to 600"),
    ({"model": "tinygpt", "seconds": True}, "'seconds' must be a number from 10 to 600"),
    ({"model": "gpt5", "seconds": 30}, "'model' must be"),
    ({"model": "bigram", "text": "../../etc/passwd"}, "'text' must be one of 'shakespeare'"),
    ({"model": "bigram", "text": "/work/main/dataset/tinyshakespeare.txt"}, "'text' must be one of"),
])
def test_a_bad_request_to_learn_gets_a_400_that_names_the_fix(api, body, said):
    status, answer = api("/api/learn", raw=body if isinstance(body, str) else json.dumps(body))
    assert status == 400 and said in answer["error"]
    assert api("/api/learn")[1]["state"] == "idle"  # nothing was started


def test_a_run_is_trained_watched_and_explored_through_the_api(api, tmp_path):
    status, run = api("/api/learn", {"model": "bigram", "text": "shakespeare"})
    assert status == 200 and run["state"] == "training" and run["out"].startswith(os.path.relpath(tmp_path, ROOT))
    assert api("/api/learn", {"model": "bigram"})[0] == 409  # one run at a time
    run = wait_until_done(api)
    assert run["state"] == "finished" and run["saved"], run
    rows = run["history"]
    assert [r["step"] for r in rows] == [0, 250, 500, 750, 1000, 1250, 1500]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1  # it learned
    assert all(r["sample"].startswith("First Citizen:\n") and len(r["sample"]) == 15 + 80 for r in rows)
    assert api("/api/learn/stop", {})[0] == 409  # nothing left to stop
    status, info = api("/api/model", {"which": "trained"})
    assert status == 200 and info["model"] == "bigram" and info["trained"] and info["name"] == run["out"]
    assert info["compare"] == "models/tinygpt.pth"  # the first model beside it, in Compare
    assert len(api("/api/lens", {"text": "ROMEO"})[1]["layers"]) == 1
    assert len(api("/api/map")[1]["points"]) == 65
    status, info = api("/api/model", {"which": "original"})
    assert status == 200 and info["model"] == "tinygpt" and not info["trained"]
    assert len(api("/api/lens", {"text": "ROMEO"})[1]["layers"]) == 6
    assert api("/api/model", {"which": "../models/x.pth"})[0] == 400


def test_a_run_stopped_twice_stops_once_and_saves_its_state(api):
    status, run = api("/api/learn", {"model": "tinygpt", "seconds": 60, "text": "shakespeare"})
    assert status == 200
    wait_for(lambda: api("/api/learn")[1]["history"], 90, "the first evaluation")
    first, second = api("/api/learn/stop", {}), api("/api/learn/stop", {})
    assert first[0] == 200 and first[1]["state"] == "stopping"
    assert second[0] in (200, 409)  # still stopping, or already stopped: either way, said plainly
    run = wait_until_done(api)
    assert run["state"] == "stopped" and run["saved"] and run["elapsed"] < 55
    assert os.path.exists(os.path.join(ROOT, os.path.splitext(run["out"])[0] + ".last.pth"))  # resumable
    assert api("/api/model", {"which": "trained"})[0] == 200


def test_a_connection_closed_mid_request_leaves_the_server_serving(api):
    with socket.create_connection(("127.0.0.1", api.port)) as raw:
        raw.sendall(f"POST /api/learn HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: 200\r\n\r\n{{\"model\": \"bigr".encode())
    time.sleep(0.2)
    assert api("/api/learn")[1]["state"] == "idle" and api("/api/info")[0] == 200


# ----------------------------------------------------------------------------------------------
# The page, in a browser


def drawn(driver, svg):
    """How many shapes an SVG holds: what is drawn, not just the element."""
    return driver.execute_script(f"return document.getElementById('{svg}').querySelectorAll('rect, circle').length")


def test_a_model_trained_from_the_page_is_watched_stopped_and_explored(browser, tmp_path):
    from selenium.webdriver.common.by import By
    made = not os.path.exists(os.path.join(ROOT, "out"))
    server = Server(tmp_path)
    url = server.url()
    out = None
    try:
        browser.get(url)
        wait_for(lambda: drawn(browser, "lens") > 0 and drawn(browser, "charmap") > 0, 60, "the shipped model's views")
        seconds = browser.find_element(By.ID, "learn-seconds")
        seconds.clear()
        seconds.send_keys("15")
        clicked = time.time()
        browser.find_element(By.ID, "learn-start").click()
        wait_for(lambda: int(browser.find_element(By.ID, "learn-curve").get_attribute("data-points") or 0) >= 1,
                 90, "the first loss drawn")
        first_loss_s = time.time() - clicked
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#learn-samples li")) >= 2, 90, "two samples")
        browser.save_screenshot(str(tmp_path / "learn.png"))
        browser.find_element(By.ID, "learn-stop").click()
        wait_for(lambda: browser.find_element(By.ID, "learn-use").is_enabled(), 90, "the run to stop")
        status = browser.find_element(By.ID, "learn-status").text
        assert status.startswith(("Stopped", "Finished")), status
        out = status.split("aved to ")[1].split(";")[0].rstrip(".")
        browser.find_element(By.ID, "learn-use").click()
        wait_for(lambda: "explorer-tinygpt" in browser.find_element(By.ID, "model-info").text, 30, "the new model")
        wait_for(lambda: drawn(browser, "lens") > 0 and drawn(browser, "charmap") > 0, 30, "its views")
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda: len(browser.find_element(By.ID, "output").text) > 60, 30, "its text")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        print(f"from the click to the first drawn loss: {first_loss_s:.1f} s")
    finally:
        server.stop()
        if out:  # what the run wrote into the repository's out/ folder
            for suffix in (".pth", ".last.pth", ".csv", ".png", ".log", ".prev.pth"):
                path = os.path.join(ROOT, os.path.splitext(out)[0] + suffix)
                if os.path.exists(path):
                    os.remove(path)
        if made and os.path.isdir(os.path.join(ROOT, "out")) and not os.listdir(os.path.join(ROOT, "out")):
            shutil.rmtree(os.path.join(ROOT, "out"))
