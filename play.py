"""Sample text from a trained smoll model, printing each character as it is generated.

    python play.py                                  # 500 characters from models/tinygpt.pth
    python play.py --prompt "ROMEO:" --length 300 --temperature 0.8 --top_k 20
    python play.py --interactive                    # type prompts, read continuations
    python play.py --model bigram                   # the Bigram, from models/model_weights.pth
    python play.py --weights models/mine.pth --seed 7 --num_samples 3
    python play.py --attention attention.png --prompt "ROMEO: I love"   # draw the attention maps
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from tqdm import tqdm

from config import MODELS
from models import (CompiledDecoder, Decoder, KVCache, TinyGPT, filter_logits, pack_for_cpu_sampling,
                    quantize_for_cpu_sampling)
from utils import (DEFAULT_WEIGHTS, DTYPES, SmollError, decisions_path, describe_device, get_device,
                   load_model, plot_attention, read_decisions, read_text, resolve_dtype, synchronize,
                   write_decisions)

INTERACTIVE_HELP = """\
Type a prompt and press Enter: the model continues it. An empty line starts from scratch.
Commands: /temperature F  /length N  /top_k N (0: off)  /top_p F (1: off)  /seed N  /settings  /help
Ctrl-C stops a long answer. Ctrl-C or Ctrl-D at the prompt (or /quit) leaves."""


# ----------------------------------------------------------------------------------------------
# How to sample on this machine: timed, not guessed
#
# Which precision samples fastest depends on the processor, not on its feature flags: on one CPU
# with bfloat16 instructions a bfloat16 matrix-vector product is 2x float32's, on another it is
# 3x slower. So play.py times a few decoding steps of each candidate path here and keeps the
# fastest. The decision is stored per CPU (or GPU), PyTorch version, model shape and batch
# size, so the next run on the same machine starts at once.

COMPILE_GUESS_S = 20.0  # what compiling a step is assumed to cost before it has been measured here
TIMED_STEPS = 24  # decoding steps timed per candidate, after a few untimed ones


@dataclass(frozen=True)
class SamplingPath:
    dtype: str  # "float32", "bfloat16", "float16", or "int8" (int8 weights, bfloat16 activations)
    compiled: bool = False  # the decoding step through torch.compile (CUDA graphs on CUDA)

    def __str__(self):
        return self.dtype + (" compiled" if self.compiled else "")


def eager_candidates(device, dtype_flag):
    """The eager paths worth timing on this device, or just the one --dtype asks for."""
    if dtype_flag != "auto":
        return [SamplingPath(dtype_flag)]
    if device.type == "cpu":  # bfloat16 where the CPU runs it natively, int8 where PyTorch has the kernel
        return [SamplingPath("float32"), SamplingPath("bfloat16"), SamplingPath("int8")]
    if device.type == "cuda":
        return [SamplingPath("float32"), SamplingPath(str(resolve_dtype("auto", device))[6:])]
    return [SamplingPath("float32")]  # MPS: float32 is what it runs best


def have_compiler(device):
    """torch.compile needs a C++ compiler for CPU code (and Triton for CUDA code, which CUDA builds ship)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def choose_path(step_seconds, n_steps, compile_seconds=None):
    """The path that writes n_steps characters soonest: each path costs n_steps times its
    seconds per step, plus its compile time if it has one still to pay (compile_seconds)."""
    compile_seconds = compile_seconds or {}
    return min(step_seconds, key=lambda p: compile_seconds.get(p, 0.0) + n_steps * step_seconds[p])


def worth_compiling(eager_step_seconds, n_steps, compile_seconds=COMPILE_GUESS_S):
    """Try compiling only if it could pay: even at twice the eager speed, it must save its cost."""
    return n_steps * eager_step_seconds / 2 > compile_seconds


def prepare_path(model, path, device):
    """A copy of model set up for path, and its decoder (None for a model without one).
    Returns None where this PyTorch cannot run the path (int8 without its kernel)."""
    model = copy.deepcopy(model)
    model.to(torch.bfloat16 if path.dtype == "int8" else DTYPES[path.dtype])
    if path.dtype == "int8":
        if device.type != "cpu" or not quantize_for_cpu_sampling(model):
            return None
    else:
        pack_for_cpu_sampling(model)  # bfloat16 on a CPU only: the same numbers, read faster
    if not isinstance(model, TinyGPT):
        return model, None
    decoder = Decoder(model)
    if path.compiled:  # PyTorch caches compiled code in /tmp unless told; beside the timings it outlives a reboot
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(decisions_path("x")), "inductor"))
        decoder = CompiledDecoder(decoder, mode=compile_mode(device))
    return model, decoder


def compile_mode(device):
    """torch.compile's mode for the decoding step: on CUDA, "reduce-overhead" records CUDA graphs,
    so that a step is one launch instead of a hundred; elsewhere the default."""
    return "reduce-overhead" if device.type == "cuda" else None


def time_steps(model, decoder, batch_size, device, steps=TIMED_STEPS):
    """Seconds per decoding step past the window (the cache full), the median of `steps` steps.
    The untimed steps before them fill the ring's last slots, so a compiled step compiles both
    its graphs (filling, and full) here, where compiling is counted."""
    layers = getattr(decoder, "decoder", decoder)  # a CompiledDecoder wraps a Decoder
    cache = KVCache(model.block_size)
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        for i in range(len(layers.layers)):
            cache.buffers(i, batch_size, layers.n_head, layers.hs, device)
        cache.pos = model.block_size - 3  # the ring full from the 4th step on, as in steady state
        times = []
        for _ in range(steps + 3):
            t0 = time.perf_counter()
            decoder.step(idx, cache)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def decision_key(model, config, device, batch_size):
    """What a timing depends on: the processor, PyTorch, the model's shape and the batch."""
    shape = {k: getattr(config, k) for k in ("model", "n_layer", "n_head", "n_embd", "block_size",
                                             "activation", "qk_norm", "logit_cap")}
    vocab = model.lm_head.out_features if hasattr(model, "lm_head") else config.block_size
    return (f"{describe_device(device)} | torch {torch.__version__} | {json.dumps(shape, sort_keys=True)} "
            f"| vocab {vocab} | batch {batch_size}")


def pick_sampling_path(model, config, device, dtype_flag="auto", eager=False, n_chars=500, batch_size=1,
                       log=None):
    """Time the candidate paths (or read their timings from the cache), and return the fastest
    for n_chars characters as (path, model, decoder, report): report says what was measured."""
    if not isinstance(model, TinyGPT):  # the Bigram is one table lookup: nothing to choose
        path = SamplingPath(dtype_flag if dtype_flag != "auto" else "float32")
        return (path, *prepare_path(model, path, device), f"{path} (a Bigram has one path)")
    key, store = decision_key(model, config, device, batch_size), decisions_path("sampling_paths.json")
    decisions = read_decisions(store)
    known = decisions.get(key, {})
    timings = {}  # path -> seconds per step
    ready = {}  # path -> (model, decoder) set up in this run
    source = "from the cache"
    for path in eager_candidates(device, dtype_flag):
        if str(path) in known.get("steps", {}):
            timings[path] = known["steps"][str(path)]
            continue
        prepared = prepare_path(model, path, device)
        if prepared is None:
            continue
        ready[path] = prepared
        timings[path] = time_steps(*prepared, batch_size, device)
        source = "timed now"
    best = choose_path(timings, n_chars)
    if not eager and have_compiler(device):
        compiled = SamplingPath(best.dtype, compiled=True)
        compile_s = known.get("compile_s", {}).get(str(compiled))
        if str(compiled) in known.get("steps", {}):
            timings[compiled] = known["steps"][str(compiled)]
        elif worth_compiling(timings[best], n_chars, compile_s or COMPILE_GUESS_S):
            if log:
                log(f"compiling the decoding step ({compiled}): it can pay back over {n_chars:,} characters")
            t0 = time.perf_counter()
            ready[compiled] = prepare_path(model, compiled, device)
            timings[compiled] = time_steps(*ready[compiled], batch_size, device)
            compile_s = time.perf_counter() - t0
            known.setdefault("compile_s", {})[str(compiled)] = compile_s
            source = "timed now"
        if compiled in timings:
            # compiled code is cached on disk by PyTorch, but loading it again still takes time
            cost = {} if compiled in ready else {compiled: compile_s or COMPILE_GUESS_S}
            best = choose_path(timings, n_chars, cost)
    known["steps"] = {**known.get("steps", {}), **{str(p): s for p, s in timings.items()}}
    decisions[key] = known
    if source == "timed now":
        write_decisions(store, decisions)
    if best not in ready:
        ready[best] = prepare_path(model, best, device)
    figures = ", ".join(f"{p} {1e3 * s:.2f} ms" for p, s in sorted(timings.items(), key=lambda kv: kv[1]))
    report = f"{best} ({source}, ms per step: {figures})"
    return (best, *ready[best], report)


# ----------------------------------------------------------------------------------------------
# The explorer: `python play.py --web` serves explorer/index.html and a small JSON API to it.
# One model serves every browser: a lock lets one forward pass run at a time, and a generation
# takes it for one character at a time, so other requests are answered while it streams.

EXPLORER_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explorer", "index.html")
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
    if isinstance(model, TinyGPT) and os.path.exists(DEFAULT_WEIGHTS["bigram"]):
        with contextlib.suppress(SmollError):
            other, other_tokenizer, _ = load_model(DEFAULT_WEIGHTS["bigram"], device)
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


# ----------------------------------------------------------------------------------------------
# The command line


def build_parser():
    parser = argparse.ArgumentParser(
        description="Generate text with a trained smoll model, streamed as it is written.")
    parser.add_argument("--model", choices=MODELS,
                        help="which shipped weights to use: tinygpt (models/tinygpt.pth, the default) "
                             "or bigram (models/model_weights.pth)")
    parser.add_argument("--weights", help="a checkpoint written by train.py; its model type is read "
                                          "from the file")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from scratch)")
    parser.add_argument("--prompt_file", help="read the prompt from this UTF-8 file instead")
    parser.add_argument("--length", type=int, default=500, help="characters to generate (default: 500)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="below 1 is safer, above 1 is wilder; 0 always takes the likeliest "
                             "character (default: 1.0)")
    parser.add_argument("--top_k", type=int, help="sample only from the k likeliest characters")
    parser.add_argument("--top_p", type=float,
                        help="sample only from the likeliest characters that together hold "
                             "probability p (nucleus sampling)")
    parser.add_argument("--num_samples", type=int, default=1,
                        help="how many continuations to write, generated together in one batch")
    parser.add_argument("--seed", type=int, help="fix the randomness: the same seed gives the same text")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "int8"), default="auto",
                        help="weights' precision while sampling. auto (the default) times a few "
                             "decoding steps of each path this device offers (CPU: float32, bfloat16, "
                             "int8 weights; CUDA: float32 and its native half precision) and keeps "
                             "the fastest; the timings are cached for the next run. int8: weights "
                             "rounded to 8 bits per output row, bfloat16 activations (CPU). In "
                             "float32 the cache gives exactly the text of --no_cache; in lower "
                             "precisions rounding can make the two differ")
    parser.add_argument("--eager", action="store_true",
                        help="never compile the decoding step, even where timing says it would pay")
    parser.add_argument("--interactive", action="store_true",
                        help="a prompt loop in the terminal; /help lists its commands")
    parser.add_argument("--verbose", action="store_true",
                        help="say which sampling path was chosen and why, and print the speed at the end")
    parser.add_argument("--no_cache", action="store_true",
                        help="decode without the KV cache: for every character, rerun the model "
                             "over all the text that can still reach it (slow; the reference the "
                             "cache is tested against)")
    parser.add_argument("--web", action="store_true",
                        help="serve the explorer, a local web page: generate, see the next-character "
                             "probabilities and the attention of each head (open the URL it prints)")
    parser.add_argument("--port", type=int, default=8000, help="--web: the port (default: 8000; 0: any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="--web: the address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--compare", metavar="WEIGHTS",
                        help="--web: a second checkpoint of the same vocabulary for the Compare panel "
                             "(default: the shipped Bigram, when its vocabulary matches)")
    parser.add_argument("--attention", metavar="PNG",
                        help="instead of generating, draw TinyGPT's attention maps for --prompt "
                             "into this PNG: one panel per layer and head (needs matplotlib)")
    return parser


def check_settings(length, temperature, top_k, top_p):
    """Raise ValueError with the fix for a bad sampling setting."""
    if length < 0:
        raise ValueError(f"--length must be 0 or more, got {length}.")
    if temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or positive, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}.")


def check_args(parser, args):
    """One clear error per bad value, before any work is done."""
    try:
        check_settings(args.length, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}.")
    if args.prompt and args.prompt_file:
        parser.error("give the prompt with --prompt or with --prompt_file, not both.")
    if args.attention and not (args.prompt or args.prompt_file):
        parser.error("--attention draws what the model attends to in a text: give one with --prompt.")
    if args.web and (args.interactive or args.attention or args.num_samples > 1 or args.no_cache):
        parser.error("--web serves the explorer: drop --interactive, --attention, --num_samples and --no_cache.")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}.")
    if args.interactive and (args.attention or args.num_samples > 1):
        parser.error("--interactive writes one continuation at a time: drop --attention and --num_samples.")


def write_continuation(model, decoder, tokenizer, prompt, args, device, what="--prompt"):
    """Print the prompt and its continuation(s). Returns (characters generated, seconds)."""
    out = sys.stdout
    start = prompt or ("\n" if "\n" in tokenizer.stoi else tokenizer.chars[0])
    ids = tokenizer.encode(start, what=what)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)  # (N, T)
    steps = model.stream(idx, args.length, args.temperature, args.top_k, args.top_p,
                         use_cache=not args.no_cache, decoder=decoder)
    t0 = time.perf_counter()
    if args.num_samples == 1:  # print each character the moment it exists
        out.write(prompt)
        out.flush()
        for next_id in steps:
            out.write(tokenizer.decode(next_id[0].tolist()))
            out.flush()
        out.write("\n")
    else:  # a batch: show progress, then each sample in turn
        new_ids = [next_id for next_id in tqdm(steps, total=args.length, file=sys.stderr, leave=False)]
        rows = torch.cat(new_ids, dim=1).tolist() if new_ids else [[] for _ in range(args.num_samples)]
        for i, row in enumerate(rows):
            out.write(f"--- sample {i + 1} of {args.num_samples} ---\n{prompt}{tokenizer.decode(row)}\n")
    out.flush()
    return args.length * args.num_samples, time.perf_counter() - t0


def report_speed(n_chars, seconds, args, device):
    mode = "no cache" if args.no_cache else "KV cache"
    print(f"[{n_chars} characters in {seconds:.2f} s: {n_chars / max(seconds, 1e-9):,.0f} characters/s, "
          f"{mode}, {device}, {args.dtype}]", file=sys.stderr)


def interactive(model, decoder, tokenizer, config, args, device):
    print(f"smoll {config.model}, {len(tokenizer.chars)} characters known, on {device}.\n{INTERACTIVE_HELP}")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.startswith("/"):
            if not run_command(line, args):
                return
            continue
        try:
            n_chars, seconds = write_continuation(model, decoder, tokenizer, line, args, device, "the prompt")
            if args.verbose:
                report_speed(n_chars, seconds, args, device)
        except KeyboardInterrupt:
            print("\n(stopped)")
        except SmollError as e:
            print(f"error: {e}")


def run_command(line, args):
    """Apply one /command to the settings in args. Returns False to leave."""
    name, _, value = line[1:].strip().partition(" ")
    value = value.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name in ("help", "h", "?"):
        print(INTERACTIVE_HELP)
        return True
    if name == "settings":
        print(f"temperature {args.temperature}, length {args.length}, top_k {args.top_k}, "
              f"top_p {args.top_p}, seed {args.seed}")
        return True
    kinds = {"temperature": float, "length": int, "top_k": int, "top_p": float, "seed": int}
    if name not in kinds:
        print(f"unknown command /{name}: /help lists the commands.")
        return True
    try:
        new = kinds[name](value)
    except ValueError:
        print(f"/{name} needs a number, e.g. /{name} {'0.8' if kinds[name] is float else '200'}.")
        return True
    if name == "top_k" and new == 0 or name == "top_p" and new == 1:
        new = None  # switched off
    settings = {"length": args.length, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, name: new}
    if name != "seed":
        try:
            check_settings(**settings)
        except ValueError as e:
            print(str(e).replace("--", "/"))
            return True
    else:
        torch.manual_seed(new)
    setattr(args, name, new)
    print(f"{name} = {new}")
    return True


def draw_attention(model, tokenizer, config, prompt, path, device):
    if not hasattr(model, "attention_maps"):
        raise SmollError(f"a {config.model} model has no attention to draw: use TinyGPT weights.")
    if len(prompt) > config.block_size:
        raise SmollError(f"--prompt has {len(prompt)} characters but the model sees at most "
                         f"{config.block_size}: shorten it (under 40 keeps the picture readable).")
    idx = torch.tensor([tokenizer.encode(prompt, what="--prompt")], device=device)  # (1, T)
    maps = model.attention_maps(idx)  # (n_layer, n_head, T, T)
    plot_attention(maps, list(prompt), path, title=f"attention of {config.model} on {prompt!r}")
    print(f"attention maps of {maps.shape[0]} layers x {maps.shape[1]} heads over "
          f"{len(prompt)} characters: {path}")


def play(args):
    device = get_device(args.device)
    weights = args.weights or DEFAULT_WEIGHTS[args.model or "tinygpt"]
    model, tokenizer, config = load_model(weights, device)
    if args.model and args.model != config.model:
        raise SmollError(f"'{weights}' holds a {config.model} model, not a {args.model}: "
                         f"drop --model, or pass --weights of a {args.model}.")
    if args.no_cache or args.attention:  # the reference decoder and the pictures: no decoder to time
        path = SamplingPath("float32" if args.dtype == "auto" else args.dtype)
        model, decoder = prepare_path(model, path, device) or prepare_path(model, SamplingPath("bfloat16"), device)
        report = f"{path} ({'--dtype auto means float32 here' if args.dtype == 'auto' else 'as --dtype asks'})"
    else:
        path, model, decoder, report = pick_sampling_path(
            model, config, device, args.dtype, args.eager, args.length,
            args.num_samples, log=lambda line: print(line, file=sys.stderr) if args.verbose else None)
    if args.verbose:
        print(f"[sampling path: {report}]", file=sys.stderr)
    args.dtype = str(path)  # for --verbose's speed line
    prompt = read_text(args.prompt_file, "--prompt_file") if args.prompt_file else args.prompt
    if args.attention:
        draw_attention(model, tokenizer, config, prompt, args.attention, device)
        return
    if args.web:
        serve(args, model, decoder, tokenizer, config, device)
        return
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.interactive:
        interactive(model, decoder, tokenizer, config, args, device)
        return
    what = "--prompt_file" if args.prompt_file else "--prompt"
    n_chars, seconds = write_continuation(model, decoder, tokenizer, prompt, args, device, what)
    if args.verbose:
        report_speed(n_chars, seconds, args, device)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        play(args)
    except SmollError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python play.py | head`: the reader left, nothing is wrong
        sys.stderr.close()


if __name__ == "__main__":
    main()
