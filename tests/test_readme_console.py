"""Every ```console block of README.md runs as written from the repository root and prints what the README shows.

Where a block runs. Each block gets a fresh temporary folder laid out like the repository's surroundings:
``repo/`` holds a symbolic link to each top-level folder of the repository (``loramix/``, ``recipes/``, ...) and
``shared/`` beside it links to the ``shared/`` folder beside the repository. Every path the README uses
(``loramix/examples/...``, ``recipes/...``, ``../shared/real-adapters/...``) therefore resolves from ``repo/``
exactly as from the repository root, while everything a command writes (``out/...``, files saved in the current
folder) lands in the temporary folder: the repository is never written to, nothing needs cleaning up afterwards and
a user's own ``out/`` is never touched. Top-level files are not linked, so a file written in the current folder
cannot go through a link into the repository. Python blocks earlier in the same README section run there first,
since they make files the section's commands use (``style.safetensors`` in the kohya section).

How a command runs. Each ``$ `` line (with its ``\\`` continuation lines) runs in bash, with ``loramix`` on PATH as
a launcher for this interpreter and this checkout's package (PYTHONPATH = the repository), HF_HUB_OFFLINE=1, an
empty HF_HOME, LC_ALL=C (so ``ls`` sorts as shown) and HF_ENDPOINT pointing at the fake loopback Hub of
tests/test_hub.py, with a made-up token. Blocks that push (``loramix push``, ``--push-to-hub``) run with
HF_HUB_OFFLINE=0, against that loopback Hub only.

How output is compared. stdout and stderr are read together in the order they were written (PYTHONUNBUFFERED=1).
Progress bars are dropped (each line is what follows its last carriage return; tqdm bar lines are removed), as are
trailing whitespace and blank lines at the end. The README's lines must then match the printed lines one for one,
exactly, except that

- ``…`` in a shown line stands for any text within that line (run-dependent values: a timing, a port number);
- a shown line that is just ``...`` (indented or not) stands for any number of lines (output the README leaves
  out).

Every other number is compared as printed: merges and searches are seeded and run in float32 on the CPU. A command
whose shown output has an ``error: ...`` line must exit with status 2 (the CLI's status for expected failures);
every other command must exit 0. Blocks that use ``../shared/real-adapters`` are skipped where it is absent.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REAL
from test_hub import TOKEN, running_fake_hub

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WILDCARD, ELIDED = "…", "..."
# A tqdm bar as it is left on the screen: "combine (svd): 100%|██████████| 8/8 [00:00<00:00, 151.88module/s]"
PROGRESS = re.compile(r"^[^|]*: *\d+%\|[^|]*\| \S+/\S+ \[.*\]$")
TIMEOUT_S = 120


@dataclass
class Block:
    """A fenced code block of the README: its language, text, first line number and the section it sits in."""

    kind: str
    text: str
    line: int
    section: str
    earlier: list[Block] = field(default_factory=list)  # the blocks before it in the same section

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}"


@dataclass
class Command:
    """One ``$ `` command of a console block and the output lines the README shows for it."""

    text: str
    expected: list[str]


def readme_blocks(text: str) -> list[Block]:
    """The README's fenced blocks in order, each with its section (the latest heading outside a code block)."""
    blocks: list[Block] = []
    section, current, body = "", None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if current is None:
            if line.startswith("```") and len(line) > 3:
                current, body = Block(line[3:].strip(), "", number + 1, section), []
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
        elif line.startswith("```"):
            current.text = "".join(f"{b}\n" for b in body)
            current.earlier = [b for b in blocks if b.section == section]
            blocks.append(current)
            current = None
        else:
            body.append(line)
    assert current is None, "README.md has an unclosed code block"
    return blocks


def commands(block: Block) -> list[Command]:
    """Split a console block into commands: a ``$ `` line, its ``\\`` continuation lines, then its output."""
    out: list[Command] = []
    continued = False
    for line in block.text.splitlines():
        if continued:
            out[-1].text += "\n" + line
        elif line.startswith("$ "):
            out.append(Command(line[2:], []))
        else:
            assert out, f"README.md line {block.line}: console block output before any '$ ' command"
            out[-1].expected.append(line.rstrip())
            continue
        continued = line.endswith("\\")
    for command in out:
        while command.expected and not command.expected[-1]:
            command.expected.pop()
    return out


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
CONSOLE = [b for b in BLOCKS if b.kind == "console"]


def printed_lines(raw: str) -> list[str]:
    """What a command printed, as compared: the text after each line's last carriage return, without progress bars,
    trailing whitespace or trailing blank lines."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in raw.split("\n")]
    lines = [line for line in lines if not PROGRESS.match(line)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def output_pattern(expected: list[str]) -> re.Pattern:
    """A regex for the whole output: ``…`` is any text within a line, a ``...`` line any number of lines (its
    indentation does not matter)."""
    parts = []
    for line in expected:
        if line.strip() == ELIDED:
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append("[^\n]*?".join(re.escape(piece) for piece in line.split(WILDCARD)) + "\n")
    return re.compile("".join(parts))


def matches(expected: list[str], printed: list[str]) -> bool:
    return output_pattern(expected).fullmatch("".join(f"{line}\n" for line in printed)) is not None


def test_matching_rules():
    """The comparison itself: exact lines, ``…`` within a line, ``...`` for any number of lines, bars dropped."""
    assert matches(["wrote out: 1 in … s"], ["wrote out: 1 in 3.6 s"])
    assert not matches(["wrote out: 1 in … s"], ["wrote out: 2 in 3.6 s"])
    assert not matches(["a … b"], ["a x", "y b"])  # … never spans lines
    assert matches(["first", "...", "last"], ["first", "last"])
    assert matches(["first", "...", "last"], ["first", "x", "y", "last"])
    assert matches(["first", "  ...", "last"], ["first", "  x", "last"])
    assert not matches(["first", "last"], ["first", "x", "last"])
    assert not matches(["first"], ["first", "extra"])
    bar = (
        "combine (svd):   0%|          | 0/8 [00:00<?, ?module/s]\r"
        "combine (svd): 100%|██████████| 8/8 [00:00<00:00, 151.88module/s]"
    )
    assert printed_lines(f"warning: x\n{bar}\nwrote out\n\n") == ["warning: x", "wrote out"]
    # the README's console blocks are found, commands with their continuation lines and outputs
    assert len(CONSOLE) >= 8
    search = next(c for b in CONSOLE for c in commands(b) if c.text.startswith("loramix search"))
    assert search.text.count("\\\n") == 2 and search.expected[0].startswith("wrote out/search: weights [")


def test_readme_module_map_is_the_bundled_one():
    """The module map the README shows is the bundled loramix/examples/minimind/module_map.yaml, word for word."""
    from loramix.examples import path

    shown = [b.text for b in BLOCKS if b.kind == "yaml" and "attention" in b.text]
    assert shown == [(path("minimind") / "module_map.yaml").read_text()]


def _layout(tmp_path: Path) -> Path:
    """``tmp_path/repo`` with links to the repository's top-level folders, and ``tmp_path/shared`` beside it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in sorted(ROOT.iterdir()):
        if entry.is_dir() and not entry.name.startswith((".", "out")):
            (repo / entry.name).symlink_to(entry, target_is_directory=True)
    if (ROOT.parent / "shared").is_dir():
        (tmp_path / "shared").symlink_to(ROOT.parent / "shared", target_is_directory=True)
    return repo


def _environment(tmp_path: Path, endpoint: str, *, online: bool) -> dict[str, str]:
    """The commands' environment: this checkout's loramix first on PATH and PYTHONPATH, offline, a loopback Hub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "loramix"
    code = "import sys; from loramix.cli import main; sys.argv[0] = 'loramix'; main()"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{code}" "$@"\n')
    launcher.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        PYTHONIOENCODING="utf-8",
        LC_ALL="C",
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=endpoint,
        HF_TOKEN=TOKEN,
        HF_HUB_OFFLINE="0" if online else "1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


@pytest.fixture
def loopback_hub():
    """The fake Hub of tests/test_hub.py on 127.0.0.1, in a thread of this process; yields it (``.url``)."""
    with running_fake_hub() as hub:
        yield hub


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=False
    )


@pytest.mark.parametrize("block", CONSOLE, ids=[b.id for b in CONSOLE])
def test_readme_console_block(block: Block, tmp_path, loopback_hub):
    if "../shared/" in block.text and not REAL.is_dir():
        pytest.skip(f"{REAL} is absent")
    repo = _layout(tmp_path)
    online = "loramix push " in block.text or "--push-to-hub" in block.text
    env = _environment(tmp_path, loopback_hub.url, online=online)
    for earlier in block.earlier:
        if earlier.kind == "python":  # it makes files this block's commands use
            done = _run([sys.executable, "-c", earlier.text], repo, env)
            assert done.returncode == 0, f"README.md python block at line {earlier.line}:\n{done.stdout.decode()}"
    for command in commands(block):
        done = _run(["bash", "-c", command.text], repo, env)
        printed = printed_lines(done.stdout.decode("utf-8", errors="replace"))
        where = f"README.md line {block.line}: $ {command.text}"
        if not matches(command.expected, printed):
            diff = "\n".join(difflib.unified_diff(command.expected, printed, "README", "printed", lineterm=""))
            pytest.fail(f"{where}\noutput differs from the README:\n{diff}")
        status = 2 if any(line.startswith("error: ") for line in command.expected) else 0
        assert done.returncode == status, f"{where}\nexit status {done.returncode}, expected {status}"
    assert not loopback_hub.unknown, f"routes the fake Hub does not serve: {loopback_hub.unknown}"
