"""Every command the docs show still works when pasted.

Commands are taken from the shell code blocks (and inline code spans) of README.md and
docs/*.md: `python tools/X.py ...`, `python -m megatron_anchor...`, `megatron-anchor-* ...`,
`torchrun ... tools/X.py` / `torchrun ... -m megatron_anchor...`, `bash examples/X.sh`.
For each one: the tool exists, its parser builds and prints `--help`, and every `--flag` the
command uses is one the tool (or torchrun) accepts, with a valid value where the flag has
fixed choices. The parser is the one the tool's `main()` really parses with, caught in
process, so this stays right when flags move between modules. A slow test also runs each
tool's `--help` as a subprocess, the way a user would. Relative links in the docs must
resolve (files and `#anchors`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
SCRIPT_DIRS = ("tools/", "examples/", "benchmarks/")
_FLAG = re.compile(r"^\[?(--[A-Za-z0-9][A-Za-z0-9_+-]*)")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ----------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------

@dataclass
class Command:
    where: str              # "README.md:15"
    kind: str               # "module", "script", "console", "bash"
    target: str             # module name, script path, console-script name
    args: List[str]         # the tool's own arguments
    launcher_args: List[str] = field(default_factory=list)  # torchrun's, before the tool

    def __str__(self):
        return f"{self.where}: {self.target} {' '.join(self.args)}".strip()


def _snippets(path: Path, text: Optional[str] = None) -> List[Tuple[int, str]]:
    """(line number, shell text) of the fenced shell blocks and of inline code spans."""
    lines = (text if text is not None else path.read_text(encoding="utf-8")).splitlines()
    out, block, lang, start = [], None, "", 0
    for n, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```+\s*([\w+-]*)", line)
        if block is None and fence:
            block, lang, start = [], fence.group(1).lower(), n + 1
        elif block is not None and re.match(r"^\s*```+\s*$", line):
            if lang in SHELL_LANGS:
                out.append((start, "\n".join(block)))
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.extend((n, span) for span in re.findall(r"`([^`]+)`", line))
    return out


def _simple_commands(text: str) -> List[Tuple[int, List[str]]]:
    """(line offset, argv) of every simple command in a shell snippet."""
    out, offset, logical = [], 0, ""
    for i, line in enumerate(text.split("\n")):
        if not logical:
            offset = i
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        lex = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # an unbalanced quote: not a command
            tokens = []
        argv: List[str] = []
        for tok in tokens + [";"]:
            if tok in ("&&", "||", ";", "|", "&", "(", ")"):
                if argv:
                    out.append((offset, argv))
                argv = []
            else:
                argv.append(tok)
        logical = ""
    return out


def _command(where: str, argv: List[str]) -> Optional[Command]:
    argv = list(argv)
    while argv and (argv[0] == "$" or _ENV.match(argv[0])):
        argv.pop(0)  # a prompt, or VAR=value before the command
    if not argv:
        return None
    prog = argv[0]
    if prog in ("python", "python3") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2 and argv[2].startswith("megatron_anchor"):
            return Command(where, "module", argv[2], argv[3:])
        if argv[1].endswith(".py") and argv[1].startswith(SCRIPT_DIRS):
            return Command(where, "script", argv[1], argv[2:])
        return None
    if prog == "torchrun":
        for i, tok in enumerate(argv[1:], 1):
            if tok == "-m" and i + 1 < len(argv):
                return Command(where, "module", argv[i + 1], argv[i + 2:], argv[1:i])
            if tok.endswith(".py"):
                return Command(where, "script", tok, argv[i + 1:], argv[1:i])
        return None
    if prog.startswith("megatron-anchor-") and "*" not in prog:
        return Command(where, "console", prog, argv[1:])
    if prog == "bash" and len(argv) > 1 and argv[1].endswith(".sh"):
        return Command(where, "bash", argv[1], argv[2:])
    return None


def commands_in(path: Path, text: Optional[str] = None) -> List[Command]:
    name = path.relative_to(ROOT) if path.is_absolute() and ROOT in path.parents else path
    found = []
    for line, snippet in _snippets(path, text):
        for offset, argv in _simple_commands(snippet):
            cmd = _command(f"{name}:{line + offset}", argv)
            if cmd is not None:
                found.append(cmd)
    return found


def all_commands() -> List[Command]:
    return [c for path in DOC_FILES for c in commands_in(path)]


# ----------------------------------------------------------------------------------------
# Resolution: which module's main() a command runs, and the parser it parses with
# ----------------------------------------------------------------------------------------

def console_scripts() -> Dict[str, str]:
    """Console-script name -> "module:function", read from setup.py without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    entries = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.match(r"^\s*(megatron-anchor-[\w-]+)\s*=\s*([\w.]+:\w+)\s*$", node.value)
            if m:
                entries[m.group(1)] = m.group(2)
    return entries


def _script_entry(script: str) -> Tuple[str, str]:
    """("module", name) for a thin wrapper that imports `main`; ("file", path) otherwise."""
    text = (ROOT / script).read_text(encoding="utf-8")
    m = re.search(r"^from\s+(megatron_anchor[\w.]*)\s+import\s+main\b", text, re.M)
    return ("module", m.group(1)) if m else ("file", script)


def entry_of(cmd: Command) -> Tuple[str, str]:
    """What runs: ("module", dotted name) or ("file", script path)."""
    if cmd.kind == "module":
        return "module", cmd.target
    if cmd.kind == "script":
        return _script_entry(cmd.target)
    if cmd.kind == "console":
        return "module", console_scripts()[cmd.target].split(":")[0]
    raise ValueError(cmd.kind)


def missing(cmd: Command) -> Optional[str]:
    """Why the command's tool does not exist, or None."""
    if cmd.kind in ("script", "bash"):
        return None if (ROOT / cmd.target).is_file() else f"no file {cmd.target}"
    if cmd.kind == "console":
        return None if cmd.target in console_scripts() else \
            f"{cmd.target} is not a console script in setup.py"
    try:
        found = importlib.util.find_spec(cmd.target) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"no module {cmd.target}"


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__("parser caught")
        self.parser = parser


_PARSERS: Dict[Tuple[str, str], argparse.ArgumentParser] = {}


def parser_of(entry: Tuple[str, str]) -> argparse.ArgumentParser:
    """The parser `main()` parses with: main(["--help"]) runs until its first parse."""
    if entry in _PARSERS:
        return _PARSERS[entry]
    kind, name = entry
    if kind == "module":
        main = importlib.import_module(name).main
    else:
        spec = importlib.util.spec_from_file_location(
            "_docs_" + re.sub(r"\W", "_", name), ROOT / name)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str((ROOT / name).parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
        main = module.main

    def caught(self, args=None, namespace=None):
        raise _Parsed(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = caught
    try:
        main(["--help"])
    except _Parsed as got:
        _PARSERS[entry] = got.parser
        return got.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{name}: main(['--help']) returned without parsing arguments")


def _options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return dict(parser._option_string_actions)


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _is_placeholder(value: str) -> bool:
    return value.startswith(("$", "<", "[", "...")) or value.isupper()


def flag_problems(parser: argparse.ArgumentParser, args: List[str], tool: str) -> List[str]:
    """Each `--flag` in args that `parser` does not accept, or given a value out of its choices."""
    options = _options(parser)
    subs = _subparsers(parser)
    problems = []
    for i, tok in enumerate(args):
        if tok in subs:  # a subcommand: its own flags from here on
            return problems + flag_problems(subs[tok], args[i + 1:], f"{tool} {tok}")
        m = _FLAG.match(tok)
        if not m:
            continue
        flag = m.group(1)
        if flag not in options:
            problems.append(f"{tool} has no flag {flag}")
            continue
        action = options[flag]
        value = tok.split("=", 1)[1] if "=" in tok else (args[i + 1] if i + 1 < len(args) else None)
        if action.choices and action.nargs in (None, "?") and value is not None \
                and not value.startswith("-") and not _is_placeholder(value):
            try:
                typed = action.type(value) if callable(action.type) else value
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                typed = value
            if typed not in action.choices:
                problems.append(f"{tool} {flag} {value}: not one of "
                                f"{', '.join(map(str, action.choices))}")
    return problems


def _torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def _forwards_to_trainer(script: str) -> bool:
    """A shell script whose extra arguments go to the trainer ("$@" on its torchrun line)."""
    path = ROOT / script
    text = path.read_text(encoding="utf-8")
    for sourced in re.findall(r"^\s*(?:source|\.)\s.*?([\w.-]+\.sh)\W*$", text, re.M):
        if (path.parent / sourced).is_file():
            text += (path.parent / sourced).read_text(encoding="utf-8")
    return "megatron_anchor.training.pretrain" in text and '"$@"' in text


def problems_of(cmd: Command) -> List[str]:
    why = missing(cmd)
    if why:
        return [why]
    problems = []
    if cmd.launcher_args:
        problems += flag_problems(_torchrun_parser(), cmd.launcher_args, "torchrun")
    if cmd.kind == "bash":
        if _forwards_to_trainer(cmd.target):
            trainer = parser_of(("module", "megatron_anchor.training.pretrain"))
            problems += flag_problems(trainer, cmd.args, f"{cmd.target} (to the trainer)")
        return problems
    parser = parser_of(entry_of(cmd))
    parser.format_help()
    return problems + flag_problems(parser, cmd.args, cmd.target)


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------

COMMANDS = all_commands()


def test_the_docs_show_commands():
    kinds = {c.kind for c in COMMANDS}
    assert len(COMMANDS) >= 30 and {"script", "module", "console", "bash"} <= kinds, \
        f"only {len(COMMANDS)} commands of kinds {kinds} found: is the extraction broken?"


def test_readme_test_command_is_what_ci_runs():
    # CI runs the README's test command; it must end with the plain pytest call.
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert any(ln.startswith("python3 -m venv") and ln.rstrip().endswith("&& python -m pytest -q")
               for ln in lines)


def test_every_documented_command_uses_real_tools_and_flags():
    problems = [f"{c.where}: {p}" for c in COMMANDS for p in problems_of(c)]
    assert not problems, "documented commands that would fail:\n" + "\n".join(problems)


def test_every_console_script_is_documented():
    documented = {entry_of(c)[1] for c in COMMANDS if c.kind != "bash" and not missing(c)}
    undocumented = [name for name, target in console_scripts().items()
                    if target.split(":")[0] not in documented]
    assert not undocumented, f"console scripts no doc page shows a command for: {undocumented}"


def test_a_flag_that_does_not_exist_is_caught():
    page = ("```bash\n"
            "python tools/preprocess_data.py --input a.jsonl --no-such-flag 1 \\\n"
            "    --tokenizer-type NoSuchTokenizer\n"
            "torchrun --nproc-per-node 2 --no-such-launcher-flag tools/verify_parity.py --cpu\n"
            "megatron-anchor-convert export --load run --hf-dir x\n"
            "bash examples/no_such_script.sh\n"
            "```\n"
            "Inline too: `megatron-anchor-pretrain --attention-variant anchors`.\n")
    cmds = commands_in(Path("fake.md"), page)
    assert [c.where for c in cmds] == ["fake.md:2", "fake.md:4", "fake.md:5", "fake.md:6",
                                       "fake.md:8"]
    found = [p for c in cmds for p in problems_of(c)]
    assert found == [
        "tools/preprocess_data.py has no flag --no-such-flag",
        "tools/preprocess_data.py --tokenizer-type NoSuchTokenizer: not one of "
        + ", ".join(parser_of(("module", "megatron_anchor.cli.preprocess_data"))
                    ._option_string_actions["--tokenizer-type"].choices),
        "torchrun has no flag --no-such-launcher-flag",
        "megatron-anchor-convert export has no flag --hf-dir",
        "no file examples/no_such_script.sh",
        "megatron-anchor-pretrain --attention-variant anchors: not one of "
        "full, intra-doc, intra-doc-reset, anchor",
    ], found


def test_design_references_resolve():
    # Code cites the design page as "docs/design.md §N" (or §N.M); each must be a heading there.
    headings = set(re.findall(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", (ROOT / "docs" / "design.md")
                              .read_text(encoding="utf-8"), re.M))
    problems = []
    for folder in ("megatron_anchor", "tools", "examples", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh", ".md", ".sbatch") or not path.is_file():
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                where = f"{path.relative_to(ROOT)}:{n}"
                if re.search(r"\bDESIGN(\.md)?\s*(§|section)", line):
                    problems.append(f"{where}: cite docs/design.md §N, not DESIGN")
                for section in re.findall(r"docs/design\.md\s*§(\d+(?:\.\d+)?)", line):
                    if section not in headings:
                        problems.append(f"{where}: docs/design.md has no section {section}")
    assert headings and not problems, "\n".join(problems)


# GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens.
def _anchors(path: Path) -> set:
    seen: Dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*```", line):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_links_in_the_docs_resolve():
    problems = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_help_of_every_documented_tool_exits_0():
    # As a user types them: each documented script and module, and each console script of
    # setup.py whose function no documented wrapper already runs (the installed wrappers
    # may predate a rename, so the function is called the way setup.py names it).
    runs = set()
    for c in COMMANDS:
        if c.kind == "script":
            runs.add((sys.executable, str(ROOT / c.target), "--help"))
        elif c.kind == "module":
            runs.add((sys.executable, "-m", c.target, "--help"))
    covered = {entry_of(c)[1] for c in COMMANDS if c.kind in ("script", "module")}
    for target in console_scripts().values():
        module, func = target.split(":")
        if module not in covered or func != "main":
            runs.add((sys.executable, "-c", f"import sys; from {module} import {func}; "
                      f"sys.exit({func}(['--help']))"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    def run(argv):
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        if done.returncode == 0 and "usage:" in done.stdout:
            return None
        return f"{' '.join(argv[1:])}: exit {done.returncode}\n{done.stderr[-800:]}"

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failures = [f for f in pool.map(run, sorted(runs)) if f]
    assert not failures, "\n".join(failures)
