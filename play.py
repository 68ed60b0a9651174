"""Sample text from a trained smoll model, printing each character as it is generated.

    python play.py                                  # 500 characters from models/tinygpt.pth
    python play.py --prompt "ROMEO:" --length 300 --temperature 0.8 --top_k 20
    python play.py --model bigram                   # the Bigram, from models/model_weights.pth
    python play.py --weights models/mine.pth --seed 7
"""

import argparse
import sys

import torch

from config import MODELS
from utils import DEFAULT_WEIGHTS, SmollError, get_device, load_model


def build_parser():
    parser = argparse.ArgumentParser(
        description="Generate text with a trained smoll model, streamed as it is written.")
    parser.add_argument("--model", choices=MODELS,
                        help="which shipped weights to use: tinygpt (models/tinygpt.pth, the default) "
                             "or bigram (models/model_weights.pth)")
    parser.add_argument("--weights", help="a checkpoint written by train.py; its model type is read "
                                          "from the file")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from scratch)")
    parser.add_argument("--length", type=int, default=500, help="characters to generate (default: 500)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="below 1 is safer, above 1 is wilder; 0 always takes the likeliest "
                             "character (default: 1.0)")
    parser.add_argument("--top_k", type=int, help="sample only from the k likeliest characters")
    parser.add_argument("--top_p", type=float,
                        help="sample only from the likeliest characters that together hold "
                             "probability p (nucleus sampling)")
    parser.add_argument("--seed", type=int, help="fix the randomness: the same seed gives the same text")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    return parser


def check_args(parser, args):
    """One clear error per bad value, before any work is done."""
    if args.length < 0:
        parser.error(f"--length must be 0 or more, got {args.length}.")
    if args.temperature < 0:
        parser.error(f"--temperature must be 0 (greedy) or positive, got {args.temperature}.")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top_k must be at least 1, got {args.top_k}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}.")


def play(args):
    device = get_device(args.device)
    weights = args.weights or DEFAULT_WEIGHTS[args.model or "tinygpt"]
    model, tokenizer, config = load_model(weights, device)
    if args.model and args.model != config.model:
        raise SmollError(f"'{weights}' holds a {config.model} model, not a {args.model}: "
                         f"drop --model, or pass --weights of a {args.model}.")
    if args.seed is not None:
        torch.manual_seed(args.seed)

    # With no prompt, start from a newline (the start of a line), or the first character.
    start = args.prompt or ("\n" if "\n" in tokenizer.stoi else tokenizer.chars[0])
    ids = tokenizer.encode(start, what="--prompt")
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for next_id in model.stream(idx, args.length, args.temperature, args.top_k, args.top_p):
        out.write(tokenizer.decode(next_id[0].tolist()))
        out.flush()
    out.write("\n")


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


if __name__ == "__main__":
    main()
