"""The explorer's server: `python play.py --web` serves the page beside this file (index.html)
and a small JSON API to it, with the standard library's HTTP server.

    GET  /               the page
    GET  /api/info       the model: its vocabulary, layers, heads, the Compare model
    POST /api/next       the next character's probabilities, before and after the sampling settings
    POST /api/attention  the attention weights of one layer and head over a text
    POST /api/generate   a generation, streamed as server-sent events, one character each
    POST /api/lens       the next character as each layer would guess it (views.logit_lens)
    GET  /api/map        the characters' embeddings in two dimensions (views.character_map)
    POST /api/learn      start a training run of train.py (learn.py); GET /api/learn: how it goes
    POST /api/learn/stop stop it as Ctrl-C does
    POST /api/model      explore the model just trained, or the one the server started with

One model serves every browser: a lock lets one forward pass run at a time, and a generation
takes it for one character at a time, so other requests are answered while it streams.
It refuses requests whose Host names another site (DNS rebinding), bodies over MAX_BODY, and
numbers that are not finite (NaN and infinities are not JSON, and a browser cannot read them back).
"""

import contextlib
import ipaddress
import json
import math
import os
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from models import TinyGPT, filter_logits
from smoll.explorer.learn import LearnError, Learner
from smoll.explorer.views import character_map, logit_lens
from smoll.files import SmollError
from smoll.sampling import fastest_decoder
from utils import DEFAULT_DATA, ROOT, SHIPPED_WEIGHTS, load_model

EXPLORER_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")
MAX_BODY = 64 * 1024  # bytes: a request body over this is refused
MAX_LENGTH = 20_000  # characters one /api/generate may ask for
MAX_TEXT = 20_000  # characters of text /api/next and /api/attention read
CANDIDATES = 20  # next characters listed, likeliest first
LENS_TOP = 5  # characters listed for each layer in /api/lens
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # names only this machine can send a request to
ALL_INTERFACES = ("", "0.0.0.0", "::")  # --host values that listen on every network interface


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
    """body[name] checked to be of kind (int, float or str) and, for a number, finite and within
    [low, high]; the default where it is missing (or null, where optional). Raises RequestError
    naming the field."""
    value = body.get(name, default)
    if value is None and (optional or name not in body):
        return default
    if kind is str:
        if not isinstance(value, str):
            raise RequestError(400, f"'{name}' must be a string, got {json.dumps(value)[:40]}.")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}, "
                                f"got {json.dumps(value)[:40]}.")
    finite = isinstance(value, int) or math.isfinite(value)  # JSON's 1e999 reads as infinity
    if not finite or (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be between {low} and {high}, got {str(value)[:40]}.")
    if kind is int and value != int(value):
        raise RequestError(400, f"'{name}' must be an integer, got {value}.")
    return kind(value)


class Explorer:
    """The model-facing half of the server: each method takes a request's JSON and answers JSON."""

    def __init__(self, model, decoder, tokenizer, config, device, compare=None, learner=None, name="the model"):
        self.model, self.decoder, self.tokenizer, self.config, self.device = model, decoder, tokenizer, config, device
        self.compare = compare  # (name, model) of a second model with the same vocabulary, or None
        self.lock = threading.Lock()
        self.learner = learner or Learner({"shakespeare": DEFAULT_DATA})  # the Learn panel's run
        self.name = name  # what the page calls the model it shows
        self.original = (model, decoder, tokenizer, config, compare, name)  # to come back to after a trained one

    def ids(self, text, name):
        """text as ids (1, T), or a RequestError that names the characters outside the vocabulary."""
        known = self.tokenizer.stoi
        if self.tokenizer.unknown is None:
            missing = sorted(set(text) - set(known))
            if missing:
                shown = " ".join(json.dumps(c, ensure_ascii=False) for c in missing[:20])
                raise RequestError(400, f"'{name}' has characters this model never saw: {shown}. Remove them, "
                                        f"or train on a text that has them.")
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
        return {"model": self.config.model, "name": self.name, "vocab": self.tokenizer.chars,
                "block_size": self.config.block_size,
                "n_layer": getattr(self.config, "n_layer", 0) if self.config.model == "tinygpt" else 0,
                "n_head": self.config.n_head if self.config.model == "tinygpt" else 0,
                "compare": self.compare[0] if self.compare else None, "max_length": MAX_LENGTH,
                "trained": self.name != self.original[5], "original": self.original[5]}

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

    def lens(self, body):
        """For the text's last character: each layer's guess at the next one, likeliest first."""
        text = get_field(body, "text", str, "")[-self.config.block_size:]
        ids = self.ids(text, "text")
        with self.lock:
            probs = logit_lens(self.model, ids)  # (n_layer, V)
        top = probs.topk(min(LENS_TOP, probs.size(1)), dim=-1)
        return {"layers": [[{"char": self.tokenizer.chars[i], "prob": round(p, 4)} for p, i in zip(ps, ix)]
                           for ps, ix in zip(top.values.tolist(), top.indices.tolist())]}

    def characters(self, _body=None):
        with self.lock:
            points, explained = character_map(self.model, self.tokenizer)
        return {"points": points, "explained": [round(e, 4) for e in explained],
                "what": "embedding" if isinstance(self.model, TinyGPT) else "table row"}

    def learn(self, body):
        try:
            return self.learner.start(get_field(body, "model", str, "tinygpt"), body.get("seconds", 30),
                                      get_field(body, "text", str, "shakespeare"))
        except LearnError as e:
            raise RequestError(e.status, str(e)) from None

    def learn_status(self, _body=None):
        return self.learner.status()

    def learn_stop(self, _body=None):
        try:
            return self.learner.stop()
        except LearnError as e:
            raise RequestError(e.status, str(e)) from None

    def use(self, body):
        """Explore the model the Learn panel trained ("trained"), or the one the server started with
        ("original"); the other panels switch to it, and Compare shows the original beside it."""
        which = get_field(body, "which", str, "")
        if which == "original":
            chosen = self.original
        elif which == "trained":
            run = self.learner.status()
            if run["state"] in ("training", "stopping"):
                raise RequestError(409, "the run is still training: wait for it to end, or stop it.")
            if not run.get("saved"):
                raise RequestError(409, "no model has been trained here yet: train one in the Learn panel.")
            try:
                model, tokenizer, config = load_model(os.path.join(ROOT, run["out"]), self.device)
            except SmollError as e:
                raise RequestError(500, str(e)) from None
            model, decoder, _, _ = fastest_decoder(model, config, self.device, timed=False)  # float32, no timing
            first = self.original
            compare = (first[5], first[0]) if first[2].chars == tokenizer.chars else None
            chosen = (model, decoder, tokenizer, config, compare, run["out"])
        else:
            raise RequestError(400, f"'which' must be \"trained\" or \"original\", got {json.dumps(which)[:40]}.")
        with self.lock:
            self.model, self.decoder, self.tokenizer, self.config, self.compare, self.name = chosen
        return self.info()

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
        try:  # strict JSON: NaN or Infinity in an answer would break the page's JSON.parse
            data = json.dumps(obj, allow_nan=False).encode("utf-8")
        except ValueError:
            status, data = 500, json.dumps({"error": "the answer holds a number that is not finite: a temperature "
                                                     "this close to 0 overflows (0 is greedy), or else the weights "
                                                     "are broken and need retraining."}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refused(self):
        """A reason to refuse the request before reading it, or None. DNS rebinding: a page on
        another site can point its own name at 127.0.0.1, but its requests still carry that name."""
        if (self.headers.get("Host") or "").lower() not in self.allowed_hosts:
            return (f"this server only answers to the addresses it prints, such as {self.allowed_hosts[0]}: "
                    f"open one of those.")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{h}" for h in self.allowed_hosts}:
            return "requests from other sites are refused."
        return None

    def do_GET(self):
        if reason := self.refused():
            return self.send_json(403, {"error": reason})
        gets = {"/api/info": "info", "/api/map": "characters", "/api/learn": "learn_status"}
        if self.path in gets:
            return self.send_json(200, getattr(self.explorer, gets[self.path])())
        if self.path == "/favicon.ico":  # the page has no icon: tell browsers so, once a day, without an error
            self.send_response(204)
            self.send_header("Cache-Control", "max-age=86400")
            return self.end_headers()
        if self.path.split("?")[0] not in ("/", "/index.html"):
            return self.send_json(404, {"error": f"no page at {self.path[:80]}: the explorer is at /."})
        try:
            with open(EXPLORER_PAGE, "rb") as f:
                page = f.read()
        except OSError as e:
            return self.send_json(500, {"error": f"cannot read {EXPLORER_PAGE} ({e.strerror}): restore it "
                                                 f"with `git checkout -- smoll/explorer/`."})
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
                  "/api/lens": self.explorer.lens, "/api/learn": self.explorer.learn,
                  "/api/learn/stop": self.explorer.learn_stop, "/api/model": self.explorer.use,
                  "/api/generate": None}
        if self.path not in routes:
            return self.send_json(404, {"error": f"no API at {self.path[:80]}: use {', '.join(routes)}."})
        try:
            body = self.read_json()
            if self.path != "/api/generate":
                return self.send_json(200, routes[self.path](body))
            characters = self.explorer.generation(body)
        except RequestError as e:
            return self.send_json(e.status, {"error": str(e)})
        self.send_events(characters)

    def read_json(self):
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "send the body with a Content-Length header.") from None
        if size > MAX_BODY:
            raise RequestError(413, f"the body is {size:,} bytes: at most {MAX_BODY:,} are read.")
        try:
            body = json.loads(self.rfile.read(size).decode("utf-8"), parse_constant=not_json)
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"the body is not JSON ({e.__class__.__name__}): send an object such as "
                                    f'{{"text": "ROMEO:"}}.') from None
        if not isinstance(body, dict):
            raise RequestError(400, 'the body must be a JSON object, such as {"text": "ROMEO:"}.')
        return body

    def send_events(self, characters):
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


def not_json(token):
    """json.loads's parse_constant: Python reads NaN, Infinity and -Infinity, which JSON has not."""
    raise RequestError(400, f"the body has {token}, which is not JSON: numbers must be finite, such as 0.8.")


SIOCGIFADDR = 0x8915  # Linux's ioctl that reads an interface's IPv4 address


def interface_addresses():
    """The address of each network interface, where the standard library can tell (Linux: IPv4 from
    the SIOCGIFADDR ioctl, IPv6 from /proc/net/if_inet6); elsewhere none."""
    found = set()
    if not sys.platform.startswith("linux"):
        return found
    import fcntl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):  # an interface without an IPv4 address
                ifreq = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.add(socket.inet_ntoa(ifreq[20:24]))  # after the 16-byte name, sockaddr_in's address
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        found.update(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(line.split()[0])) for line in f)
    return found


def own_addresses():
    """This machine's names and addresses: its host name, its full name, what they resolve to, and
    its interfaces' addresses. A server on every interface is reached by any of them."""
    names = {socket.gethostname(), socket.getfqdn()} - {""}
    for name in list(names):
        with contextlib.suppress(OSError):
            names.update(info[4][0].split("%")[0] for info in socket.getaddrinfo(name, None))  # no %zone
    return {name.lower() for name in names | interface_addresses()}


def served_names(host):
    """The names and addresses a browser can reach a server on host by, the one to open first: on
    every interface, the loopback names and this machine's own; else host (and the loopback names,
    which only this machine can send, so a page elsewhere cannot use them to rebind)."""
    if host in ALL_INTERFACES:
        return list(dict.fromkeys([*LOOPBACK, *sorted(own_addresses(), key=lambda n: (":" in n, n))]))
    return list(dict.fromkeys(["127.0.0.1" if host == "localhost" else host.lower(), *LOOPBACK]))


def reachable_from_elsewhere(name):
    """Whether another machine may reach this one by name: not a loopback or link-local address."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name not in LOOPBACK
    return not (address.is_loopback or address.is_link_local)


def url(name, port):
    return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"


class ExplorerServer(ThreadingHTTPServer):
    """One thread a request, none of which holds up Ctrl-C; make_server sets address_family from --host."""

    daemon_threads = True

    def server_bind(self):
        if self.address_family == socket.AF_INET6:  # "::" takes IPv4 too, as `python -m http.server` does
            with contextlib.suppress(AttributeError, OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the browser left before its answer was written (a reload, a closed tab): nothing is wrong
        super().handle_error(request, client_address)


def make_server(explorer, host="127.0.0.1", port=0):
    """A threading HTTP server for explorer on host:port (port 0: any free one). Call serve_forever().
    server.served_names are the names it answers to, the one to open first."""
    handler = type("Handler", (ExplorerHandler,), {"explorer": explorer})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = type("Server", (ExplorerServer,), {"address_family": family})((host, port), handler)
    bound = [] if host in ALL_INTERFACES else [server.server_address[0]]  # what a --host name resolved to
    server.served_names = list(dict.fromkeys([*served_names(host), *bound]))
    port = server.server_address[1]
    hosts = [f"[{name}]" if ":" in name else name for name in server.served_names]
    # A browser sends Host (and Origin) as name:port, and a bare name for port 80.
    handler.allowed_hosts = tuple([f"{h}:{port}" for h in hosts] + (hosts if port == 80 else []))
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


def serve(args, model, decoder, tokenizer, config, device, weights=None):
    if not os.path.isfile(EXPLORER_PAGE):
        raise SmollError(f"the explorer's page {EXPLORER_PAGE} is missing: restore it with "
                         f"`git checkout -- smoll/explorer/`.")
    texts = {"shakespeare": DEFAULT_DATA}  # what the Learn panel may train on: keys, never paths from the page
    if args.data:
        if not os.path.isfile(args.data):
            raise SmollError(f"text file '{args.data}' does not exist: pass an existing file with --data.")
        texts["yours"] = os.path.abspath(args.data)
    learner = Learner(texts)
    explorer = Explorer(model, decoder, tokenizer, config, device, compare_model(args, model, tokenizer, device),
                        learner, os.path.relpath(weights, ROOT) if weights else config.model)
    try:
        server = make_server(explorer, args.host, args.port)
    except socket.gaierror as e:
        raise SmollError(f"cannot listen on --host {args.host} ({e.strerror}): pass an address or name of this "
                         f"machine, such as 127.0.0.1 or 0.0.0.0.") from None
    except OSError as e:
        raise SmollError(f"cannot listen on {args.host}:{args.port} ({e.strerror}): pass another --port "
                         f"(0 picks a free one).") from None
    if args.host not in LOOPBACK:
        tunnel = args.port or 8000  # the same port on both ends: the Host check includes it
        print(f"warning: --host {args.host} lets other machines on the network use this model and its page; "
              f"an SSH tunnel to the default --host 127.0.0.1 is the safer way to reach it from elsewhere "
              f"(ssh -L {tunnel}:127.0.0.1:{tunnel} you@this-machine, then open http://127.0.0.1:{tunnel}/).",
              file=sys.stderr)
    port, names = server.server_address[1], server.served_names
    print(f"smoll explorer for {config.model} ({len(tokenizer.chars)} characters): {url(names[0], port)} "
          f"(Ctrl-C stops it)", flush=True)
    others = [url(name, port) for name in names[1:] if reachable_from_elsewhere(name)]
    if others and args.host in ALL_INTERFACES:
        print(f"from other machines: {'  '.join(others)}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        learner.close()  # a run still training is stopped as Ctrl-C would, and saved

