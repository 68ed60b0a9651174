"""The explorer's server: `python play.py --web` serves the page beside this file (index.html)
and a small JSON API to it, with the standard library's HTTP server.

    GET  /               the page
    GET  /api/info       the model: its vocabulary, layers, heads, the Compare model
    POST /api/next       the next character's probabilities, before and after the sampling settings
    POST /api/attention  the attention weights of one layer and head over a text
    POST /api/generate   a generation, streamed as server-sent events, one character each

One model serves every browser: a lock lets one forward pass run at a time, and a generation
takes it for one character at a time, so other requests are answered while it streams.
It refuses requests whose Host names another site (DNS rebinding) and bodies over MAX_BODY.
"""

import contextlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from models import TinyGPT, filter_logits
from utils import SHIPPED_WEIGHTS, SmollError, load_model

EXPLORER_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")
MAX_BODY = 64 * 1024  # bytes: a request body over this is refused
MAX_LENGTH = 20_000  # characters one /api/generate may ask for
MAX_TEXT = 20_000  # characters of text /api/next and /api/attention read
CANDIDATES = 20  # next characters listed, likeliest first


class RequestError(Exception):
    """A bad request: the status and the sentence that names the fix, sent back as JSON."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def next_char_distribution(model, ids, temperature=1.0, top_k=None, top_p=None):
    """For the text ids (1, T): the next character's probabilities (V,) from the raw logits, and
    after temperature, top-k and top-p, as sampling would draw it. Also the raw logits, so that a
    page can redo the settings itself. With the full context the model can use (no cache)."""
    with torch.no_grad():
        logits = model(ids[:, -model.receptive_field:])[0][:, -1].float()  # (1, V)
    raw = torch.softmax(logits, dim=-1)[0]  # (V,)
    if temperature == 0:  # greedy: all the probability on the likeliest character
        settled = torch.zeros_like(raw).scatter_(0, raw.argmax()[None], 1.0)
    else:
        settled = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)[0]
    return raw, settled, logits[0]


def get_field(body, name, kind, default=None, low=None, high=None, optional=False):
    """body[name] checked to be of kind (int, float or str) and within [low, high]; the default
    where it is missing (or null, where optional). Raises RequestError naming the field."""
    value = body.get(name, default)
    if value is None and (optional or name not in body):
        return default
    ok = isinstance(value, str) if kind is str else (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                     and (kind is float or float(value).is_integer()))
    if not ok:
        raise RequestError(400, f"'{name}' must be {'a string' if kind is str else 'a number' if kind is float else 'an integer'}"
                                f", got {json.dumps(value)[:40]}.")
    value = value if kind is str else kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {value}.")
    return value


class Explorer:
    """The model-facing half of the server: each method takes a request's JSON and answers JSON."""

    def __init__(self, model, decoder, tokenizer, config, device, compare=None):
        self.model, self.decoder, self.tokenizer, self.config, self.device = model, decoder, tokenizer, config, device
        self.compare = compare  # (name, model) of a second model with the same vocabulary, or None
        self.lock = threading.Lock()

    def ids(self, text, name):
        """text as ids (1, T), or a RequestError that names the characters outside the vocabulary."""
        known = self.tokenizer.stoi
        if self.tokenizer.unknown is None:
            missing = sorted(set(text) - set(known))
            if missing:
                raise RequestError(400, f"'{name}' has characters this model never saw: "
                                        f"{' '.join(json.dumps(c, ensure_ascii=False) for c in missing[:20])}. Remove them, or train "
                                        f"on a text that has them.")
        ids = self.tokenizer.encode(text or ("\n" if "\n" in known else self.tokenizer.chars[0]), what=name)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def settings(self, body):
        temperature = get_field(body, "temperature", float, 1.0, 0, 100)
        top_k = get_field(body, "top_k", int, None, 0, 1_000_000, optional=True) or None
        top_p = get_field(body, "top_p", float, None, 0, 1, optional=True)
        if top_p == 0:
            raise RequestError(400, "'top_p' must be above 0 (1 or null: off).")
        return temperature, top_k, top_p

    def info(self, _body=None):
        return {"model": self.config.model, "vocab": self.tokenizer.chars, "block_size": self.config.block_size,
                "n_layer": getattr(self.config, "n_layer", 0) if self.config.model == "tinygpt" else 0,
                "n_head": self.config.n_head if self.config.model == "tinygpt" else 0,
                "compare": self.compare[0] if self.compare else None, "max_length": MAX_LENGTH}

    def next(self, body):
        text = get_field(body, "text", str, "")[-MAX_TEXT:]
        settings = self.settings(body)
        ids = self.ids(text, "text")
        with self.lock:
            raw, settled, logits = next_char_distribution(self.model, ids, *settings)
            other = next_char_distribution(self.compare[1], ids)[0] if self.compare else None
        ranked = sorted(range(len(raw)), key=lambda i: (-settled[i].item(), -raw[i].item()))  # ties: by raw
        top = ranked[:CANDIDATES]
        answer = {"candidates": [{"char": self.tokenizer.chars[i], "prob": round(settled[i].item(), 6),
                                  "raw_prob": round(raw[i].item(), 6)} for i in top],
                  "chars": self.tokenizer.chars, "logits": [round(v, 4) for v in logits.tolist()]}
        if other is not None:
            order = other.argsort(descending=True)[:CANDIDATES].tolist()
            answer["compare"] = {"name": self.compare[0], "candidates": [
                {"char": self.tokenizer.chars[i], "prob": round(other[i].item(), 6)} for i in order]}
        return answer

    def attention(self, body):
        if not hasattr(self.model, "attention_maps"):
            raise RequestError(400, f"a {self.config.model} model has no attention to show: load TinyGPT weights.")
        text = get_field(body, "text", str, "")[-self.config.block_size:]
        layer = get_field(body, "layer", int, 0, 0, self.config.n_layer - 1)
        head = get_field(body, "head", int, 0, 0, self.config.n_head - 1)
        ids = self.ids(text, "text")
        with self.lock:
            maps = self.model.attention_maps(ids).float()  # (n_layer, n_head, T, T), as --attention draws
        return {"chars": [self.tokenizer.chars[i] for i in ids[0].tolist()],
                "map": [[round(v, 4) for v in row] for row in maps[layer, head].tolist()],
                "last": [[[round(v, 4) for v in h] for h in layer_rows] for layer_rows in maps[:, :, -1].tolist()]}

    def generation(self, body):
        """Check a /api/generate request and return its stream of characters (a generator)."""
        prompt = get_field(body, "prompt", str, "")
        length = get_field(body, "length", int, 500, 0, MAX_LENGTH)
        settings = self.settings(body)
        seed = get_field(body, "seed", int, None, 0, 2**63 - 1, optional=True)
        ids = self.ids(prompt, "prompt")
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        steps = self.model.stream(ids, length, *settings, decoder=self.decoder, generator=generator)

        def characters():
            try:
                while True:
                    with self.lock:  # one character's forward pass at a time, whoever asked
                        next_id = next(steps, None)
                    if next_id is None:
                        return
                    yield self.tokenizer.decode(next_id[0].tolist())
            finally:
                steps.close()

        return characters()


class ExplorerHandler(BaseHTTPRequestHandler):
    """The HTTP half: GET / is the page, POST /api/* answers JSON (or streams, for /api/generate)."""

    explorer = None  # set by make_server
    allowed_hosts = ()  # the Host values this server answers to: a page elsewhere must not drive it
    server_version = "smoll"

    def log_message(self, format, *args):  # one line a request would drown the terminal
        pass

    def send_json(self, status, obj):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refused(self):
        """A reason to refuse the request before reading it, or None. DNS rebinding: a page on
        another site can point its own name at 127.0.0.1, but its requests still carry that name."""
        if self.headers.get("Host") not in self.allowed_hosts:
            return f"this server only answers to {self.allowed_hosts[0]}: open that address."
        origin = self.headers.get("Origin")
        if origin is not None and origin not in {f"http://{h}" for h in self.allowed_hosts}:
            return "requests from other sites are refused."
        return None

    def do_GET(self):
        if reason := self.refused():
            return self.send_json(403, {"error": reason})
        if self.path == "/api/info":
            return self.send_json(200, self.explorer.info())
        if self.path.split("?")[0] not in ("/", "/index.html"):
            return self.send_json(404, {"error": f"no page at {self.path[:80]}: the explorer is at /."})
        try:
            with open(EXPLORER_PAGE, "rb") as f:
                page = f.read()
        except OSError as e:
            return self.send_json(500, {"error": f"cannot read {EXPLORER_PAGE} ({e.strerror}): restore it "
                                                 f"with `git checkout -- explorer/`."})
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        self.wfile.write(page)

    def do_POST(self):
        if reason := self.refused():
            return self.send_json(403, {"error": reason})
        routes = {"/api/next": self.explorer.next, "/api/attention": self.explorer.attention,
                  "/api/generate": None}
        if self.path not in routes:
            return self.send_json(404, {"error": f"no API at {self.path[:80]}: use /api/next, /api/attention "
                                                 f"or /api/generate."})
        try:
            body = self.read_json()
            if self.path != "/api/generate":
                return self.send_json(200, routes[self.path](body))
            characters = self.explorer.generation(body)
        except RequestError as e:
            return self.send_json(e.status, {"error": str(e)})
        self.stream(characters)

    def read_json(self):
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "send the body with a Content-Length header.") from None
        if size > MAX_BODY:
            raise RequestError(413, f"the body is {size:,} bytes: at most {MAX_BODY:,} are read.")
        try:
            body = json.loads(self.rfile.read(size).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"the body is not JSON ({e.__class__.__name__}): send an object such as "
                                    f'{{"text": "ROMEO:"}}.') from None
        if not isinstance(body, dict):
            raise RequestError(400, 'the body must be a JSON object, such as {"text": "ROMEO:"}.')
        return body

    def stream(self, characters):
        """Server-sent events: one `data: {"text": ...}` event a character, then `event: done`.
        A browser that goes away (Stop, a closed tab) ends the generation at its next character."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for text in characters:
                self.write_event(f"data: {json.dumps({'text': text})}\n\n".encode("utf-8"))
            self.write_event(b"event: done\ndata: {}\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser left: closing the generator below stops the model
        finally:
            characters.close()


    def write_event(self, data):
        self.wfile.write(data)
        self.wfile.flush()  # now, not when a buffer fills: the page shows each character as it comes


def make_server(explorer, host="127.0.0.1", port=0):
    """A threading HTTP server for explorer on host:port (port 0: any free one). Call serve_forever()."""
    handler = type("Handler", (ExplorerHandler,), {"explorer": explorer})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    port = server.server_address[1]
    names = dict.fromkeys(["127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"])
    handler.allowed_hosts = tuple(f"{name}:{port}" for name in names)
    return server


def compare_model(args, model, tokenizer, device):
    """The second model of the Compare panel: --compare, or the shipped Bigram when its vocabulary matches."""
    if args.compare:
        other, other_tokenizer, _ = load_model(args.compare, device, flag="--compare")
        if other_tokenizer.chars != tokenizer.chars:
            raise SmollError(f"'{args.compare}' has another vocabulary than the model: pass --compare weights "
                             f"trained on the same text.")
        return os.path.basename(args.compare), other
    if isinstance(model, TinyGPT) and os.path.exists(SHIPPED_WEIGHTS["bigram"]):
        with contextlib.suppress(SmollError):
            other, other_tokenizer, _ = load_model(SHIPPED_WEIGHTS["bigram"], device)
            if other_tokenizer.chars == tokenizer.chars:
                return "bigram", other
    return None


def serve(args, model, decoder, tokenizer, config, device):
    if not os.path.isfile(EXPLORER_PAGE):
        raise SmollError(f"the explorer's page {EXPLORER_PAGE} is missing: restore it with `git checkout -- explorer/`.")
    explorer = Explorer(model, decoder, tokenizer, config, device, compare_model(args, model, tokenizer, device))
    try:
        server = make_server(explorer, args.host, args.port)
    except OSError as e:
        raise SmollError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): pass another --port "
                         f"(0 picks a free one).") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} lets other machines on the network use this model and its page; "
              f"the default, 127.0.0.1, keeps it to this one.", file=sys.stderr)
    port = server.server_address[1]
    print(f"smoll explorer for {config.model} ({len(tokenizer.chars)} characters): http://127.0.0.1:{port}/ "
          f"(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()

