"""Sample text from a trained smoll model, printing each character as it is generated.

    python play.py                                  # 500 characters from models/tinygpt.pth
    python play.py --prompt "ROMEO:" --length 300 --temperature 0.8 --top_k 20
    python play.py --interactive                    # type prompts, read continuations
    python play.py --model bigram                   # the Bigram, from models/model_weights.pth
    python play.py --weights out/mine.pth --seed 7 --num_samples 3
    python play.py --attention out/attention.png --prompt "ROMEO: I love"   # draw the attention maps
    python play.py --web                            # the explorer: a local web page (docs/explorer.md)
    python play.py --prepare                        # compile the decoding step for this CPU now

Read from main() at the bottom, or from play(): load_model (utils.py) reads the checkpoint,
fastest_decoder (smoll/sampling) sets the model up for the fastest way to write one character on
this machine, and write_continuation hands both to the model's stream() (models.py), which samples
one character after another while this prints them.
"""


import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from config import MODELS
from smoll.devices import get_device
from smoll.files import SmollError
from smoll.sampling import fastest_decoder, prepare_packages, start_background_build
from utils import DEFAULT_OUT, SHIPPED_WEIGHTS, load_model, read_text

INTERACTIVE_HELP = """\
Type a prompt and press Enter: the model continues it. An empty line starts from scratch.
Commands: /temperature F  /length N  /top_k N (0: off)  /top_p F (1: off)  /seed N  /settings  /help
Ctrl-C stops a long answer. Ctrl-C or Ctrl-D at the prompt (or /quit) leaves."""

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
    parser.add_argument("--top_k", type=int,
                        help="sample only from the k likeliest characters (0: off, as without the flag)")
    parser.add_argument("--top_p", type=float,
                        help="sample only from the likeliest characters that together hold "
                             "probability p (nucleus sampling)")
    parser.add_argument("--num_samples", type=int, default=1,
                        help="how many continuations to write, generated together in one batch")
    parser.add_argument("--seed", type=int, help="fix the randomness: the same seed gives the same text")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "int8"), default="auto",
                        help="weights' precision while sampling. auto (the default) times a few "
                             "decoding steps of each precision this device offers (CPU: float32, bfloat16, "
                             "int8 weights; CUDA: float32 and its native half precision) and keeps "
                             "the fastest; the timings are cached for the next run. int8: weights "
                             "rounded to 8 bits per output row, bfloat16 activations (CPU). In "
                             "float32 the cache gives exactly the text of --no_cache; in lower "
                             "precisions rounding can make the two differ")
    parser.add_argument("--eager", action="store_true",
                        help="never compile the decoding step, nor build it in the background")
    parser.add_argument("--prepare", action="store_true",
                        help="compile the decoding step for this CPU, model and --num_samples now, "
                             "20 s to a minute and a half for each of its three variants on 2 cores, "
                             "and say how fast each samples. "
                             "Later runs load it in milliseconds. Without this flag, play.py builds it "
                             "in a background process after its first run (SMOLL_BACKGROUND_BUILD=0: "
                             "never)")
    parser.add_argument("--interactive", action="store_true",
                        help="a prompt loop in the terminal; /help lists its commands")
    parser.add_argument("--verbose", action="store_true",
                        help="say which way of sampling (precision, compiled or not) was chosen and why, "
                             "and print the speed at the end")
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
    parser.add_argument("--data", metavar="TEXT",
                        help="--web: a UTF-8 text the explorer's Learn panel may train on, besides "
                             "dataset/tinyshakespeare.txt")
    parser.add_argument("--compare", metavar="WEIGHTS",
                        help="--web: a second checkpoint of the same vocabulary for the Compare panel "
                             "(default: the shipped Bigram, when its vocabulary matches)")
    parser.add_argument("--attention", metavar="PNG",
                        help="instead of generating, draw TinyGPT's attention maps for --prompt "
                             "into this PNG: one panel per layer and head (needs matplotlib)")
    return parser


def check_settings(length, temperature, top_k, top_p):
    """Raise ValueError with the fix for a bad sampling setting. top_k 0, like None, is off.
    Python's float() reads "nan" and "inf": they are refused here, not deep inside the sampler."""
    if length < 0:
        raise ValueError(f"--length must be 0 or more, got {length}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be 0 (greedy) or positive and finite, got {temperature}.")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top_k must be 0 (off) or more, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:  # nan fails this too
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}.")


def check_args(parser, args):
    """One clear error per bad value, before any work is done."""
    try:
        check_settings(args.length, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    args.top_k = args.top_k or None  # 0: off, as /top_k 0 in --interactive and the explorer's API
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}.")
    if args.prompt and args.prompt_file:
        parser.error("give the prompt with --prompt or with --prompt_file, not both.")
    if args.attention and not (args.prompt or args.prompt_file):
        parser.error("--attention draws what the model attends to in a text: give one with --prompt.")
    if args.web and (args.interactive or args.attention or args.num_samples > 1 or args.no_cache):
        parser.error("--web serves the explorer: drop --interactive, --attention, --num_samples and --no_cache.")
    if args.data and not args.web:
        parser.error("--data names a text the explorer's Learn panel may train on: add --web (to train from "
                     "the command line: python train.py --data TEXT).")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}.")
    if args.prepare and (args.web or args.interactive or args.attention or args.no_cache or args.eager):
        parser.error("--prepare builds the compiled step and exits: drop --web, --interactive, --attention, "
                     "--no_cache and --eager.")
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


def report_speed(n_chars, seconds, args, device, variant):
    mode = "no cache" if args.no_cache else "KV cache"
    print(f"[{n_chars} characters in {seconds:.2f} s: {n_chars / max(seconds, 1e-9):,.0f} characters/s, "
          f"{mode}, {device}, {variant}]", file=sys.stderr)


def interactive(model, decoder, tokenizer, config, args, device, variant):
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
                report_speed(n_chars, seconds, args, device, variant)
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
    from smoll.pictures import plot_attention  # the pictures and the explorer are imported when asked for
    plot_attention(maps, list(prompt), path, title=f"attention of {config.model} on {prompt!r}")
    print(f"attention maps of {maps.shape[0]} layers x {maps.shape[1]} heads over "
          f"{len(prompt)} characters: {path}")


def play(args):
    device = get_device(args.device)
    weights = args.weights or SHIPPED_WEIGHTS[args.model or "tinygpt"]
    yours = DEFAULT_OUT[args.model or "tinygpt"]
    if args.weights is None and os.path.isfile(yours):  # say which of the two plays, and how to play the other
        print(f"[the shipped {os.path.relpath(weights)}; the one you trained plays with --weights "
              f"{os.path.relpath(yours)}]", file=sys.stderr)
    model, tokenizer, config = load_model(weights, device)
    if args.model and args.model != config.model:
        raise SmollError(f"'{weights}' holds a {config.model} model, not a {args.model}: "
                         f"drop --model, or pass --weights of a {args.model}.")
    if args.prepare:
        prepare_packages(model, config, device, args.dtype, args.num_samples)
        return
    # The fastest way to write one character here: each variant (precision, compiled or not) timed
    # on this machine once, the fastest kept. model becomes a copy set up for it (in bfloat16, say),
    # and decoder its one-character step. The reference decoder and the pictures time nothing.
    # Timing draws no random numbers: the seed, set below, gives the same text either way.
    as_loaded = model  # the float32 weights: what a compiled step is built from
    model, decoder, variant, report = fastest_decoder(
        as_loaded, config, device, args.dtype, args.eager, args.length, args.num_samples,
        log=lambda line: print(line, file=sys.stderr) if args.verbose else None,
        timed=not (args.no_cache or args.attention))
    if args.verbose:
        print(f"[sampling path: {report}]", file=sys.stderr)
    prompt = read_text(args.prompt_file, "--prompt_file") if args.prompt_file else args.prompt
    if args.attention:
        draw_attention(model, tokenizer, config, prompt, args.attention, device)
        return
    # Where this CPU has no compiled step for the model yet, it is built in a background process at
    # the lowest priority (smoll/sampling/packages.py): beside a long session, or after the text.
    build_later = not (args.eager or args.no_cache)
    if build_later and (args.web or args.interactive):
        start_background_build(as_loaded, device, weights, args.dtype, args.num_samples)
    if args.web:
        from smoll.explorer.server import serve
        serve(args, model, decoder, tokenizer, config, device, weights)
        return
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.interactive:
        interactive(model, decoder, tokenizer, config, args, device, variant)
        return
    what = "--prompt_file" if args.prompt_file else "--prompt"
    n_chars, seconds = write_continuation(model, decoder, tokenizer, prompt, args, device, what)
    if args.verbose:
        report_speed(n_chars, seconds, args, device, variant)
    if build_later:  # the next run loads it; this one was not slowed
        start_background_build(as_loaded, device, weights, args.dtype, args.num_samples)


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
