"""The pages tell the truth: every command they give takes the flags it names, every relative link
and picture exists, and no page speaks of the project's history. Run with
`python -m pytest tests/test_docs.py`. (The examples of docs/how-it-works.md run as doctests:
`python -m pytest docs/how-it-works.md`.)"""

import glob
import os
import re
import shlex

import pytest

import play
import train
from conftest import ROOT
from smoll import bench

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PARSERS = {"train.py": train.build_parser, "play.py": play.build_parser, "smoll.bench": bench.build_parser}


def page_id(path):
    return os.path.relpath(path, ROOT)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def commands(text):
    """Every smoll command in a page's code (blocks and `spans`), as (script, [arguments])."""
    code = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL) + re.findall(r"`([^`\n]+)`", text)
    found = []
    for chunk in code:
        for line in chunk.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()  # a comment after the command
            match = re.search(r"(?:python(?:3)? (train\.py|play\.py|-m smoll\.bench)|torchrun .*?(train\.py))(.*)", line)
            if match:
                script = (match.group(1) or match.group(2)).replace("-m ", "")
                found.append((script, match.group(3)))
    return found


def placeholder(word):
    """A word that stands for a value of the user's choosing: N, SECONDS, PATH, BIG.txt, ..."""
    return word in ("...", "…") or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?", word))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_on_a_page_takes_its_flags(page):
    checked = 0
    for script, rest in commands(read(page)):
        try:
            args = shlex.split(rest)
        except ValueError:  # a command that runs over two lines of a table: its flags are checked alone
            args = rest.replace('"', " ").split()
        parser = PARSERS[script]()
        known = parser._option_string_actions  # every --flag the parser takes, by its exact name
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=")[0] in known, f"{page_id(page)}: `{script}` has no flag {arg} ({rest.strip()})"
        if not any(placeholder(a) for a in args) and "--help" not in args and "|" not in rest and ">" not in rest:
            try:
                parser.parse_args(args)  # values of the right type and among the choices
            except SystemExit:
                pytest.fail(f"{page_id(page)}: `python {script}{rest}` does not parse")
        checked += 1
    if page.endswith(("README.md", "training.md", "sampling.md", "how-it-works.md")):
        assert checked, "a page that teaches the commands gives none"


def slug(heading):
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces as hyphens."""
    heading = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_and_picture_exists(page):
    text = read(page)
    text_without_code = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text_without_code):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(file), f"{page_id(page)} links to {target}, which does not exist"
        if anchor and file.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", read(file), flags=re.DOTALL), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page_id(page)} links to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_pages_speak_of_smoll_now_not_of_its_history(page):
    """No commit hashes, and no figures said to come from another version of the code."""
    history = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b|last commit|"
                         r"earlier (suite|version)|before the (compiled|split|fixes)|older versions")
    lines = [line for line in read(page).splitlines() if history.search(line)]
    assert not lines, f"{page_id(page)} speaks of smoll's history: {lines[:3]}"


def test_the_commands_found_include_the_quick_start():
    found = commands(read(os.path.join(ROOT, "README.md")))
    assert ("train.py", " --preset cpu") in [(s, r.split("  ")[0]) for s, r in found]
    assert ("smoll.bench", "") in found or any(s == "smoll.bench" for s, _ in found)
