"""smoll's machinery: what the learner's five files call by name, so that they can stay short.

You need not read this package to follow smoll. models.py, train.py, play.py, config.py and utils.py
hold the ideas; each module here holds one concern and says so in its docstring.

    files.py          every file written whole or not at all, disk errors as sentences, the cache folder
    data.py           token files: a text too big to read at once, encoded once and memory-mapped
                      (utils.load_text_ids calls it past 16 MiB)
    devices.py        the device (cuda, mps, cpu), its fastest precision, the CPU's name and extensions
    distributed.py    the machine a run trains on, torchrun, Ctrl-C and every process's random state
                      (train.py: setup_machine, ctrl_c_stops, stop_requested, rng_states)
    speed.py          the warm-up before training: the faster attention, torch.compile, the estimate
                      (train.py: warm_up)
    muon.py           torch.optim.Muon, with the matrices of one shape orthogonalised together
                      (train.py: make_optimizers)
    ensemble.py       several models as one, and distillation from them (train.py --teacher)
    eval_table.py     train.py --eval_only: checkpoints scored side by side
    pictures.py       the loss curve and the attention maps (matplotlib, optional)
    sampling/         the fast sampling engine (play.py: fastest_decoder, start_background_build)
        decoder.py    the decoding step in few calls, with fast bfloat16 and int8 weights
        packages.py   the step compiled ahead of time for a CPU, kept on disk
        choose.py     which variant of the step samples fastest here, timed and kept
    explorer/         play.py --web: a local web page (index.html) and the standard-library server behind
                      it (server.py); the Learn panel's training runs (learn.py); each layer's guess and
                      the characters' map (views.py)
    bench.py          `python -m smoll.bench`: training and sampling speed here, beside nanoGPT's way

Imports point one way: the learner's scripts (train.py, play.py) use this package, and this
package uses models.py, config.py and utils.py. utils.py itself builds on the two modules that
import nothing else of smoll's: files.py and data.py.
"""
