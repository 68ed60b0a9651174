"""The fast sampling engine: what makes play.py write characters quickly on any machine.

    fastest_decoder(model, config, device) -> (model, decoder, variant, report)   play.py's one call
    start_background_build(model, device, weights)   after play.py's text, where a compiled step is missing

Three concerns, a file each, each importing only the ones before it:
    decoder.py   the decoding step: TinyGPT's forward pass for one new character in few calls, its
                 weights laid out to be read fast (bfloat16 packed, int8), torch.compile on CUDA
    packages.py  the step compiled ahead of time for a CPU (AOTInductor), kept on disk per machine,
                 PyTorch, code and model, checked before it is trusted, built in the background
    choose.py    which variant (precision, compiled or not) samples fastest here: timed, and kept
models.py's stream() is the reference: the tests check every variant against it. The engine knows
nothing about text or tokenizers.
"""

from smoll.sampling.choose import fastest_decoder, prepare_packages
from smoll.sampling.packages import start_background_build

__all__ = ["fastest_decoder", "prepare_packages", "start_background_build"]
