"""Numbers that are not numbers: NaN and the infinities, which Python's float() and json read, are
refused by play.py's flags, by the /commands of --interactive and by the explorer's API, each with the
sentence other bad values get; the API's answers stay strict JSON; and top_k 0 means off everywhere.
Run with `python -m pytest tests/test_numbers.py`."""

import http.client
import json
import threading

import pytest
import torch

import smoll.explorer.server as explorer_server
import play
import train
from models import sample_next
from smoll.sampling.decoder import Variant, prepare
from utils import SHIPPED_WEIGHTS, load_model

NOT_FINITE = ["nan", "inf", "-inf"]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("flag, said", [
    ("--temperature", "--temperature must be 0 (greedy) or positive and finite, got {value}."),
    ("--top_p", "--top_p must be in (0, 1], got {value}."),
])
def test_flags_refuse_numbers_that_are_not_finite(flag, said, value, capsys):
    with pytest.raises(SystemExit) as stop:
        play.main([f"{flag}={value}"])  # with "=": argparse takes a lone "-inf" for a flag
    assert stop.value.code == 2
    assert said.format(value=float(value)) in capsys.readouterr().err


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("flag", ["--time_budget", "--learning_rate", "--dropout", "--weight_decay"])
def test_train_py_refuses_numbers_that_are_not_finite(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main([f"{flag}={value}"])
    assert stop.value.code == 2
    assert f"{flag} must be a finite number, got {float(value)}." in capsys.readouterr().err


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("name, said", [
    ("temperature", "/temperature must be 0 (greedy) or positive and finite, got {value}."),
    ("top_p", "/top_p must be in (0, 1], got {value}."),
])
def test_the_repl_refuses_numbers_that_are_not_finite(name, said, value, capsys):
    args = play.build_parser().parse_args([])
    before = getattr(args, name)
    assert play.run_command(f"/{name} {value}", args)
    assert said.format(value=float(value)) in capsys.readouterr().out
    assert getattr(args, name) == before  # the setting is kept


def test_top_k_0_is_off_for_the_flag_as_for_the_repl_and_the_api(capsys):
    parser = play.build_parser()
    args = parser.parse_args(["--top_k", "0"])
    play.check_args(parser, args)
    assert args.top_k is None
    assert "0: off" in parser.format_help()
    repl = parser.parse_args(["--top_k", "5"])
    play.run_command("/top_k 0", repl)
    assert repl.top_k is None
    with pytest.raises(SystemExit):
        play.check_args(parser, parser.parse_args(["--top_k", "-1"]))
    assert "--top_k must be 0 (off) or more, got -1." in capsys.readouterr().err


def test_the_flag_top_k_0_writes_the_text_of_no_top_k(capsys):
    common = ["--prompt", "ROMEO:", "--length", "60", "--seed", "5", "--dtype", "float32"]
    play.main(common + ["--top_k", "0"])
    off = capsys.readouterr().out
    play.main(common)
    assert off == capsys.readouterr().out


@pytest.fixture(scope="module")
def server():
    model, tokenizer, config = load_model(SHIPPED_WEIGHTS["tinygpt"])
    model, decoder = prepare(model, Variant("float32"), torch.device("cpu"))
    explorer = explorer_server.Explorer(model, decoder, tokenizer, config, torch.device("cpu"))
    server = explorer_server.make_server(explorer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def post_raw(port, path, raw):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read(), parse_constant=lambda token: pytest.fail(f"{token} in the answer"))
    connection.close()
    return response.status, answer


@pytest.mark.parametrize("path", ["/api/next", "/api/generate"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k"])
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_the_api_refuses_nan_and_infinity_tokens(server, path, field, token):
    status, answer = post_raw(server, path, f'{{"text": "ROMEO:", "{field}": {token}}}'.encode())
    assert status == 400
    assert answer["error"] == f"the body has {token}, which is not JSON: numbers must be finite, such as 0.8."


@pytest.mark.parametrize("field, said", [
    ("temperature", "'temperature' must be between 0 and 100, got inf."),
    ("top_p", "'top_p' must be between 0 and 1, got inf."),
    ("top_k", "'top_k' must be between 0 and 1000000, got inf."),
    ("seed", "'seed' must be between 0 and 9223372036854775807, got inf."),
])
def test_the_api_refuses_numbers_too_big_for_a_float_naming_the_field(server, field, said):
    path = "/api/generate" if field == "seed" else "/api/next"
    status, answer = post_raw(server, path, f'{{"text": "ROMEO:", "{field}": 1e999}}'.encode())
    assert status == 400 and answer["error"] == said


def test_the_api_refuses_nan_even_from_a_caller_that_skips_the_parser():
    for value in (float("nan"), float("inf")):
        with pytest.raises(explorer_server.RequestError, match="'temperature' must be between 0 and 100"):
            explorer_server.get_field({"temperature": value}, "temperature", float, 1.0, 0, 100)


def test_an_answer_that_is_not_finite_is_a_500_in_strict_json():
    class Broken:  # a model whose weights went NaN: its answer cannot be JSON
        def info(self):
            return {"prob": float("nan")}

    server = explorer_server.make_server(Broken(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        connection.request("GET", "/api/info")
        response = connection.getresponse()
        answer = json.loads(response.read(), parse_constant=lambda token: pytest.fail(f"{token} in the answer"))
        assert response.status == 500 and "not finite" in answer["error"]
        connection.close()
    finally:
        server.shutdown()


def test_a_temperature_just_above_0_samples_like_greedy_instead_of_overflowing():
    logits = torch.tensor([[2.0, 5.0, -1.0, 4.999]])
    for temperature in (1e-45, 1e-30, 1e-6):
        ids = {sample_next(logits, temperature).item() for _ in range(20)}
        assert ids == {1}  # the likeliest character, every time
    assert sample_next(logits, 0).item() == 1
