"""The README and docs/ hold no broken promises: links resolve and the commands they show parse.

* Every relative link and image in README.md, docs/*.md and the benchmarks' NOTES.md points at
  a file that exists (and a ``#anchor`` into a markdown file at one of its headings, by GitHub's
  slug rule).
* Every ``python`` code block parses.
* Every command line in a ``bash`` code block is accepted by its parser as far as building its
  configuration and checking its inputs, without training or compiling anything:
  ``python train.py ARGS`` by :func:`transformer_jax.cli.train.configure`,
  ``python -m transformer_jax.X ARGS`` by that command's parser, ``python benchmarks/x.py ARGS``
  by the script's own parser (stopped right after parsing). A command that reads a run directory
  (``sample``, ``translate``, ``visualize``, ``make_figures.py``) must name one that a
  ``train.py`` command somewhere in the docs writes, so that a reader who follows the docs has it.
* No two ``train.py`` commands write one run directory with different runs: a reader who runs
  both would find the second refused (or resuming the first).

Lines are read as a shell would: ``\\`` continuations joined, ``$ `` prompts and comments
dropped, ``&&``/``;``/``&``/``|`` separate commands, ``VAR=value`` prefixes and ``time`` are
skipped, and a quoted command (``ssh ... --command "python train.py ..."``) is checked too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The benchmarks' notes: their links are checked too; their commands are history, not checked.
NOTES = sorted((ROOT / "benchmarks" / "results").glob("*/NOTES.md"))

SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
# Commands the docs may show that this test does not parse (installers, other tools, shell).
SKIPPED = {"pytest", "pip", "tensorboard", "git", "bash", "cd", "wait", "done", "export",
           "gcloud", "srun", "ls", "cat", "iconv", "curl", "nvidia-smi", "for", "kill"}
# Shell values the docs' commands use in place of a real one.
SHELL_VARS = {"i": "0", "TPU": "my-tpu", "ZONE": "us-central2-b"}
# Commands that read a run directory: module -> the parsed arguments that name one.
RUN_ARGS = {"sample": ("run",), "translate": ("run",), "visualize": ("run", "runs"),
            "make_figures": ("run", "compare", "translate_run")}
# Run directories the docs name on purpose without a command that writes them.
HYPOTHETICAL_RUNS: set[str] = set()


@dataclass(frozen=True)
class Command:
    """One command line shown in a code block: where, and its words after ``python``."""

    doc: str
    line: int
    words: tuple[str, ...]

    @property
    def id(self) -> str:
        text = " ".join(self.words)
        return f"{self.doc}:{self.line} {text[:90]}"


# ---------------------------------------------------------------------------------------------
# Reading the docs


def _code_blocks(text: str):
    """(language, first line number, lines) of every fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield lang, start + 1, body
        i += 1


def _prose(text: str, *, spans: bool = False) -> str:
    """The markdown outside fenced code blocks (and inline code spans unless ``spans``)."""
    out, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line if spans else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _logical_lines(lang: str, start: int, body: list[str]):
    """(line number, text) of each command line: continuations joined, prompts stripped."""
    pending, first = "", None
    for n, raw in enumerate(body, start):
        line = raw.rstrip()
        if lang == "console" and not line.lstrip().startswith("$ ") and not pending:
            continue  # output, not a command
        line = re.sub(r"^\s*\$ ", "", line) if not pending else line
        if first is None:
            first = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        if text.strip():
            yield first, text
        first = None


def _simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command on a shell line (operators split, comments dropped)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(words)
            words = []
        else:
            words.append(re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VARS.get(m[1], m[0]), token))
    commands.append(words)
    return [c for c in commands if c]


def _python_commands(words: list[str]) -> list[tuple[str, ...]]:
    """The ``python ...`` commands in one simple command (inside quoted arguments too)."""
    while words and (re.match(r"^\w+=", words[0]) or words[0] in ("time", "do", "then")):
        words = words[1:]
    if not words:
        return []
    for i, word in enumerate(words):
        if word in ("python", "python3") and (i == 0 or words[0] in SKIPPED):
            return [tuple(words[i + 1:])]
    if words[0] in SKIPPED:
        inner = [w for w in words if " python" in f" {w}" and " " in w]
        return [c for w in inner for sub in _simple_commands(w) for c in _python_commands(sub)]
    raise ValueError(f"unknown command {words[0]!r}: show it outside a bash block, or add it "
                     "to SKIPPED in tests/test_docs.py")


def _commands() -> list[Command]:
    found = []
    for doc in DOCS:
        rel = doc.relative_to(ROOT).as_posix()
        for lang, start, body in _code_blocks(doc.read_text(encoding="utf-8")):
            if lang not in SHELL_BLOCKS:
                continue
            for line, text in _logical_lines(lang, start, body):
                for words in _simple_commands(text):
                    try:
                        pythons = _python_commands(words)
                    except ValueError as e:
                        pythons = [("<unknown>", str(e))]
                    found += [Command(rel, line, p) for p in pythons]
    return found


def _links() -> list[tuple[str, str]]:
    """(doc, target) of every relative link and image outside code."""
    found = []
    for doc in DOCS + NOTES:
        prose = _prose(doc.read_text(encoding="utf-8"))
        targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
        targets += re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", prose)
        targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.MULTILINE)  # [x]: y
        rel = doc.relative_to(ROOT).as_posix()
        found += [(rel, t) for t in dict.fromkeys(targets)  # each target once per doc
                  if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return found


def _python_blocks() -> list[tuple[str, int, str]]:
    return [(doc.relative_to(ROOT).as_posix(), start, "\n".join(body)) for doc in DOCS
            for lang, start, body in _code_blocks(doc.read_text(encoding="utf-8"))
            if lang == "python"]


COMMANDS = _commands()
LINKS = _links()
PYTHON_BLOCKS = _python_blocks()


# ---------------------------------------------------------------------------------------------
# Links


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


@cache
def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path.read_text(encoding="utf-8"), spans=True).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_the_docs_have_links_and_commands_to_check():
    assert len(DOCS) >= 2 and len(LINKS) >= 5 and len(COMMANDS) >= 10


@pytest.mark.parametrize("doc,target", LINKS, ids=[f"{d} -> {t}" for d, t in LINKS])
def test_relative_link_resolves(doc, target):
    path_part, _, anchor = target.partition("#")
    path = (ROOT / doc).parent / path_part if path_part else ROOT / doc
    if not path.exists():
        pytest.fail(f"{doc}: link to {target!r}: {path.relative_to(ROOT)} does not exist",
                    pytrace=False)
    if anchor and path.suffix == ".md" and anchor not in _anchors(path):
        pytest.fail(f"{doc}: link to {target!r}: no heading of {path.name} has the anchor "
                    f"#{anchor}", pytrace=False)


@pytest.mark.parametrize("doc,line,code", PYTHON_BLOCKS,
                         ids=[f"{d}:{n}" for d, n, _ in PYTHON_BLOCKS])
def test_python_example_is_valid_python(doc, line, code):
    try:
        compile(code, f"{doc}:{line}", "exec")
    except SyntaxError as e:
        pytest.fail(f"{doc}:{line}: the python block does not parse: {e}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# Commands


class _Parsed(Exception):
    """Raised by the patched ``parse_args``: the benchmark parsed its flags; stop before it runs."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def _out(train_cfg) -> str:
    """The run directory a training configuration writes (the one place that knows where the
    configuration keeps it)."""
    return _norm(train_cfg.out)


def _norm(path) -> str:
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(ROOT):
        path = path.relative_to(ROOT)
    return os.path.normpath(path.as_posix())


@pytest.fixture(scope="module")
def trained() -> dict[Command, tuple]:
    """(model, training) configuration of each ``python train.py`` command of the docs that
    configures (``--config`` left out: the run it copies is another command's)."""
    from transformer_jax.cli import train

    found = {}
    for command in COMMANDS:
        if command.words[:1] == ("train.py",):
            try:
                found[command] = train.configure(_with_fixture_data(
                    _with_config_files(list(command.words[1:]), None)))
            except (SystemExit, ValueError, LookupError):
                pass  # this command's own test case says why
    return found


@pytest.fixture(scope="module")
def written_runs(trained) -> set[str]:
    """Every run directory some ``python train.py`` command of the docs writes."""
    return {_out(train_cfg) for _, train_cfg in trained.values()}


def test_no_two_commands_train_different_runs_into_one_directory(trained):
    """A reader who runs two commands of the docs must not find the second refused (or resuming
    the first's run) because both write one directory: each run its own ``--out``."""
    from transformer_jax.runs.identity import model_identity, resume_differences

    first: dict[str, tuple[Command, tuple]] = {}
    clashes = []
    for command, (model_cfg, train_cfg) in trained.items():
        if "--config" in command.words:
            continue  # a copy of another run's configuration, into its own --out
        out = _out(train_cfg)
        if out not in first:
            first[out] = (command, (model_cfg, train_cfg))
            continue
        other, (model0, train0) = first[out]
        fixed = resume_differences(train0, train_cfg)[0]
        if model_identity(model0.to_dict()) != model_identity(model_cfg.to_dict()):
            fixed = ["the model", *fixed]
        if fixed:
            clashes.append(f"{other.doc}:{other.line} and {command.doc}:{command.line} both "
                           f"write {out} but train different runs ({'; '.join(fixed)}): give "
                           "one of them its own --out")
    assert not clashes, "\n".join(clashes)


@cache
def _pairs_dataset() -> str:
    """A tiny parallel dataset, prepared once, standing in for the docs' ``--data`` folders of
    ``--task translate`` (train.py reads the vocabulary from the dataset it is given)."""
    import tempfile

    from transformer_jax.data.pair_files import pair_files
    from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs

    root = Path(tempfile.mkdtemp(prefix="docs-pairs-"))
    words = ["file", "open", "could", "not", "the", "save", "error", "read", "write", "disk"]
    lines = [f"{a} {b} {c}\t{c} {b} {a}" for a in words for b in words for c in words[:3]]
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_pairs(pair_files([root / "pairs.tsv"]), root / "ds", PairSettings(vocab_size=300),
                  log=lambda message: None)
    return str(root / "ds")


def _with_fixture_data(argv: list[str]) -> list[str]:
    """``--task translate --data DIR`` with DIR missing: the tiny dataset instead."""
    if "--data" in argv and "--task" in argv and argv[argv.index("--task") + 1] == "translate":
        i = argv.index("--data") + 1
        if i < len(argv) and not Path(argv[i]).exists():
            return [*argv[:i], _pairs_dataset(), *argv[i + 1:]]
    return argv


def _with_config_files(argv: list[str], tmp_path: Path | None) -> list[str]:
    """``--config runs/X/config.json``: written into ``tmp_path`` from the command of the docs
    that trains ``runs/X`` (None: leave the flag out, to learn the run's own directory)."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if tmp_path is None:
        return argv[:i] + argv[i + 2:]
    from transformer_jax.cli import train
    from transformer_jax.runs import rundir

    run = _norm(Path(argv[i + 1]).parent)
    producers = [c for c in COMMANDS if c.words[:1] == ("train.py",) and "--config" not in c.words]
    for c in producers:
        try:
            if _out(train.configure(list(c.words[1:]))[1]) == run:
                (tmp_path / run).mkdir(parents=True)
                rundir.write_config(tmp_path / run, *train.configure(list(c.words[1:])))
                return argv[:i + 1] + [str(tmp_path / run / "config.json")] + argv[i + 2:]
        except SystemExit:
            continue
    pytest.fail(f"--config {argv[i + 1]}: no train.py command in the docs writes {run}")


@cache
def _benchmark(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_docs_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(words: tuple[str, ...], monkeypatch, tmp_path) -> tuple[str, argparse.Namespace]:
    """(command name, parsed arguments) of ``python WORDS``; SystemExit where it is refused."""
    head, argv = words[0], list(words[1:])
    if head == "train.py":
        from transformer_jax.cli import train

        return "train", argparse.Namespace(
            cfg=train.configure(_with_fixture_data(_with_config_files(argv, tmp_path))))
    if head == "-m" and argv and argv[0].startswith("transformer_jax."):
        name = argv[0].removeprefix("transformer_jax.")
        module = importlib.import_module(f"transformer_jax.cli.{name}")
        return name, module._parser().parse_args(argv[1:])
    if head.startswith("benchmarks/") and head.endswith(".py"):
        name = Path(head).stem
        module = _benchmark(name)
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            raise _Parsed(original(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        monkeypatch.setattr(os, "environ", dict(os.environ))  # a script may set XLA_FLAGS
        try:
            module.main(argv)
        except _Parsed as parsed:
            return name, parsed.namespace
        pytest.fail(f"benchmarks/{name}.py main() returned without parsing its flags")
    pytest.fail(f"not a command of this project: python {' '.join(words)}")


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_is_accepted(command, written_runs, monkeypatch, tmp_path, capsys):
    assert command.words[0] != "<unknown>", f"{command.doc}:{command.line}: {command.words[1]}"
    try:
        name, args = _parse(command.words, monkeypatch, tmp_path)
    except SystemExit as e:
        if e.code == 0 and {"-h", "--help"} & set(command.words):
            return
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{command.doc}:{command.line}: `python {' '.join(command.words)}` is "
                    f"refused (exit {e.code}): {err[-1] if err else ''}", pytrace=False)
    for attr in RUN_ARGS.get(name, ()):
        value = getattr(args, attr, None)
        for run in [value] if isinstance(value, (str, os.PathLike)) else value or []:
            run = _norm(run)
            assert run in written_runs or run in HYPOTHETICAL_RUNS, (
                f"{command.doc}:{command.line}: {run} is read, but no `python train.py` command "
                f"in README.md or docs/ writes it (they write: {', '.join(sorted(written_runs))})")
