"""The explorer's Learn panel: a training run of train.py, started from the page and watched as it learns.

    Learner(texts).start(model, seconds, text)  -> starts `python train.py ...` in a process of its own
    Learner.status()                            -> what the run has done so far, for the page to draw
    Learner.stop()                              -> stops it as Ctrl-C does: saved, and resumable

The run is train.py itself, in a subprocess, with the command line a user would type: it writes to
out/ like any run (never to models/), and its history file NAME.csv, rewritten whole at every
evaluation, is what the page reads: the losses, the learning rate, tokens/s and the sample written at
that evaluation. One run at a time, held by the server, so it outlives a closed tab and a reopened
page finds it. The browser names a text by its key in `texts`, never by a path.
"""

import contextlib
import csv
import math
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

from utils import DEFAULT_OUT, ROOT

MIN_SECONDS, MAX_SECONDS = 10, 600  # TinyGPT's time budget, as the page offers it
OUT_FOLDER = os.path.dirname(DEFAULT_OUT["tinygpt"])  # where train.py writes: out/
# What Stop sends the run, which train.py takes as it takes Ctrl-C (smoll.distributed.ctrl_c_stops).
# Not SIGINT itself: a server started in the background (`&`, nohup) passes SIGINT on ignored.
STOP_SIGNAL = signal.SIGTERM if os.name == "posix" else signal.CTRL_BREAK_EVENT


class LearnError(Exception):
    """A request the Learn panel cannot take: the HTTP status and the sentence that names the fix."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Learner:
    """The one training run of the explorer, and what it has done so far."""

    def __init__(self, texts):
        self.texts = texts  # key -> the path of a text the server was started with
        self.lock = threading.Lock()
        self.process = None
        self.run = None  # what the page needs to know of the run: model, seconds, text, out, ...

    def start(self, model, seconds, text):
        """Start `python train.py` for model ("tinygpt": --preset cpu for `seconds`; "bigram") on the
        text of key `text`, into a new checkpoint in out/. Raises LearnError where it cannot."""
        if model not in ("tinygpt", "bigram"):
            raise LearnError(400, f"'model' must be \"tinygpt\" or \"bigram\", got {model!r:.40}.")
        if text not in self.texts:
            raise LearnError(400, f"'text' must be one of {', '.join(map(repr, self.texts))}, got {text!r:.40}.")
        if model == "tinygpt" and not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                                       and math.isfinite(seconds) and MIN_SECONDS <= seconds <= MAX_SECONDS):
            raise LearnError(400, f"'seconds' must be a number from {MIN_SECONDS} to {MAX_SECONDS}, "
                                  f"got {str(seconds)[:40]}.")
        with self.lock:
            if self.process is not None and self.process.poll() is None:
                raise LearnError(409, "a run is already training: stop it first, or wait for it to end.")
            name = f"explorer-{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            out = os.path.join(OUT_FOLDER, name + ".pth")
            command = [sys.executable, os.path.join(ROOT, "train.py"), "--data", self.texts[text], "--out", out]
            if model == "tinygpt":
                # Short runs evaluate more often, so that their curve has points to draw.
                command += ["--preset", "cpu", "--time_budget", f"{seconds:g}",
                            "--eval_interval", "50" if seconds <= 60 else "200"]
            else:
                command += ["--model", "bigram"]
            os.makedirs(OUT_FOLDER, exist_ok=True)
            log = open(os.path.join(OUT_FOLDER, name + ".log"), "w", encoding="utf-8")
            options = {"start_new_session": True} if os.name == "posix" else {
                "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # Stop sends it CTRL_BREAK
            try:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, cwd=ROOT, **options)
            finally:
                log.close()  # the process has its own copy
            self.run = {"model": model, "seconds": seconds if model == "tinygpt" else None, "text": text,
                        "out": os.path.relpath(out, ROOT), "command": " ".join(command[1:]),
                        "started": time.time(), "stopping": False}
            return self.status_locked()

    def stop(self):
        """Ask the run to stop as Ctrl-C does: it finishes its step, saves and exits (resumable)."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                raise LearnError(409, "no run is training: there is nothing to stop.")
            if not self.run["stopping"]:
                self.run["stopping"] = True
                self.process.send_signal(STOP_SIGNAL)
            return self.status_locked()

    def status(self):
        with self.lock:
            return self.status_locked()

    def close(self, wait_s=120):
        """When the server stops: a run still training is stopped as Ctrl-C would stop it (it saves),
        and waited for."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                return
            print(f"stopping the Learn panel's run, which saves to {self.run['out']}", file=sys.stderr, flush=True)
            if not self.run["stopping"]:
                self.run["stopping"] = True
                self.process.send_signal(STOP_SIGNAL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(wait_s)

    def status_locked(self):
        """The run's state ("idle", "training", "stopping", "finished", "stopped" or "failed"), its
        settings, its history so far (one row per evaluation, with its sample), and the seconds it
        has been going."""
        if self.run is None:
            return {"state": "idle", "texts": list(self.texts)}
        code = self.process.poll()
        state = ("stopping" if self.run["stopping"] else "training") if code is None else \
            "finished" if code == 0 else "stopped" if code == 130 else "failed"
        answer = {**self.run, "state": state, "texts": list(self.texts), "history": self.history(),
                  "elapsed": round(time.time() - self.run["started"], 1)}
        answer["saved"] = os.path.isfile(os.path.join(ROOT, self.run["out"]))
        if state == "failed":  # what went wrong, in train.py's own words: the last line of its output
            answer["error"] = self.last_line()
        return answer

    def history(self):
        """The rows of the run's NAME.csv so far (train.py rewrites it whole at every evaluation)."""
        path = os.path.splitext(os.path.join(ROOT, self.run["out"]))[0] + ".csv"
        try:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError:
            return []
        numbers = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "time_s")
        return [{k: (float(v) if k in numbers else v) for k, v in row.items()} for row in rows]

    def last_line(self):
        try:
            with open(os.path.splitext(os.path.join(ROOT, self.run["out"]))[0] + ".log", encoding="utf-8") as f:
                lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
        except OSError:
            return "the run ended without a word"
        return lines[-1][:300] if lines else "the run ended without a word"
