"""The docs a newcomer walks (issue 25): the README stays short, its set-up
section comes first, every `luvmm ...` command it shows is one the CLI has
(subcommand and options), its test command is the one `.ci/run` runs, and
every relative link in the README, CHANGELOG.md and docs/ resolves -- to a
file, and to a heading of it where the link names one."""

import argparse
import re
from pathlib import Path

import pytest

from luvmm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200
SETUP = "Set-up on a fresh machine"
MAIN_COMMANDS = "The main commands"


def _sections(text: str) -> dict[str, str]:
    """The README's `## ` sections by heading (fenced code included in their body)."""
    found, name, body, fenced = {}, None, [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            if name is not None:
                found[name] = "\n".join(body)
            name, body = line[3:].strip(), []
        elif name is not None:
            body.append(line)
    if name is not None:
        found[name] = "\n".join(body)
    return found


def _code_lines(body: str) -> list[str]:
    lines, fenced = [], False
    for line in body.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line)
    return lines


def _prose(body: str) -> str:
    out, fenced = [], False
    for line in body.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return "\n".join(out)


def _commands(body: str) -> list[str]:
    """The `luvmm ...` commands a section shows: code-block lines and inline code spans."""
    found = [line.split(" #")[0].strip() for line in _code_lines(body) if line.startswith("luvmm ")]
    found += [" ".join(m.split()) for m in re.findall(r"`(luvmm [^`]+)`", _prose(body))]
    return found


def readme_commands() -> list[str]:
    sections = _sections(README.read_text())
    return _commands(sections[SETUP]) + _commands(sections[MAIN_COMMANDS])


def _words(command: str) -> list[str]:
    """The subcommand words of a command (`luvmm vm start NAME ...` -> vm, start)."""
    words = []
    for token in command.split()[1:]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", token):
            break  # an option, `[...]`, a NAME placeholder, `--`, `|`...
        words.append(token)
    return words


def _options(command: str) -> list[str]:
    """The long options a command shows, up to a `--` that ends them."""
    head = command.split(" -- ")[0]
    return re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", head)


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        parser = subs[0].choices[word]
    return parser


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}"


def test_setup_is_the_first_section():
    assert next(iter(_sections(README.read_text()))) == SETUP


def test_readme_shows_commands():
    sections = _sections(README.read_text())
    assert _commands(sections[SETUP]), "no luvmm command in the set-up section"
    assert len(_commands(sections[MAIN_COMMANDS])) >= 10, "the main-commands list is nearly empty"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_exists(command, capsys):
    words = _words(command)
    assert words, f"{command!r}: no subcommand"
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*words, "--help"])
    err = capsys.readouterr().err
    assert exit_.value.code == 0, f"{command!r}: `luvmm {' '.join(words)}` is not a command: {err.strip()}"
    sub = _subparser(build_parser(), words)
    unknown = [o for o in _options(command) if o not in sub._option_string_actions]
    assert not unknown, f"{command!r}: `luvmm {' '.join(words)}` has no option {', '.join(unknown)}"


def _test_command(text: str) -> str:
    [line] = [line.strip() for line in text.splitlines()
              if re.search(r"\bpytest\b", line) and not line.lstrip().startswith("#") and " pip " not in line]
    return line


def test_readme_test_command_is_what_ci_runs():
    readme = _test_command("\n".join(_code_lines(_sections(README.read_text())[SETUP])))
    ci = _test_command((ROOT / ".ci" / "run").read_text())
    assert readme == ci


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = "\n".join(line for line in _prose(path.read_text()).splitlines())
    text = re.sub(r"`[^`]*`", "", text)  # code spans hold brackets that are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def doc_pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_pages_exist():
    assert (ROOT / "CHANGELOG.md").is_file()
    assert len(doc_pages()) > 3


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue  # http:, https:, mailto:
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            broken.append(f"{link}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{link}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
