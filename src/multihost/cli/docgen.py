"""Shell completion and man pages generated from the argparse tree (the source of ``--help``).

Owns: walking the parser tree (:func:`walk`), the bash completion script (:func:`bash`; zsh
loads it through ``bashcompinit``: :func:`zsh`), and the roff of ``multihost(8)``
(:func:`manpage`) and ``multihost.toml(5)`` (:func:`config_manpage`, from the commented
example configuration).  ``scripts/gen-docs.py`` writes them to ``docs/man/`` and
``contrib/completion/``; a unit test fails when a written file is out of date.

Must not: hold command logic or import anything heavy; it only reads parser objects.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass

#: Option metavars / positional names completed as file names.
_FILE_HINTS = ("FILE", "PATH", "DIR")


@dataclass(frozen=True)
class Command:
    """One (sub)command: its words after ``multihost`` and its parser."""

    path: tuple[str, ...]
    parser: argparse.ArgumentParser
    help: str

    @property
    def name(self) -> str:
        return " ".join(self.path)


def _subparsers(
    p: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def walk(
    p: argparse.ArgumentParser, path: tuple[str, ...] = (), help_text: str = ""
) -> Iterator[Command]:
    """Every command, depth first, the root (``path == ()``) first."""
    yield Command(path, p, help_text)
    sub = _subparsers(p)
    if sub is None:
        return
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    seen: set[int] = set()
    for name, child in sub.choices.items():
        if id(child) in seen:  # an alias
            continue
        seen.add(id(child))
        yield from walk(child, (*path, name), helps.get(name, ""))


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _positionals(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in p._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def _takes_value(a: argparse.Action) -> bool:
    return a.nargs != 0


def _is_file(a: argparse.Action) -> bool:
    meta = a.metavar if isinstance(a.metavar, str) else a.dest.upper()
    return any(h in meta.upper() for h in _FILE_HINTS)


def _subcommands(p: argparse.ArgumentParser) -> list[str]:
    sub = _subparsers(p)
    return [] if sub is None else list(sub.choices)


# ------------------------------------------------------------------------------ bash
def _q(words: list[str]) -> str:
    return "'" + " ".join(words).replace("'", "'\\''") + "'"


def bash(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for ``multihost`` (``source`` it, or install it in
    ``/usr/share/bash-completion/completions/multihost``)."""
    prog = parser.prog
    subs, opts, takes, files, choices, posfiles = [], [], [], [], [], []
    for c in walk(parser):
        name = " ".join((prog, *c.path))  # bash refuses an empty key
        key = _q([name])
        subs.append(f"  [{key}]={_q(_subcommands(c.parser))}")
        options = _options(c.parser)
        opts.append(f"  [{key}]={_q([s for a in options for s in a.option_strings])}")
        takes.append(
            f"  [{key}]=" + _q([s for a in options if _takes_value(a) for s in a.option_strings])
        )
        files.append(
            f"  [{key}]="
            + _q([s for a in options if _takes_value(a) and _is_file(a) for s in a.option_strings])
        )
        for a in options:
            if a.choices:
                for s in a.option_strings:
                    choices.append(f"  [{_q([name, s])}]={_q([str(x) for x in a.choices])}")
        for a in _positionals(c.parser):
            if a.choices:
                choices.append(f"  [{_q([name, '-'])}]={_q([str(x) for x in a.choices])}")
        if any(_is_file(a) for a in _positionals(c.parser)):
            posfiles.append(name)
    fn = "_" + re.sub(r"\W", "_", prog)
    return f"""\
# bash completion for {prog}; generated from its argparse parsers by
# 'multihost completion bash' (do not edit).
declare -A {fn}_subs=(
{chr(10).join(subs)}
)
declare -A {fn}_opts=(
{chr(10).join(opts)}
)
declare -A {fn}_takes=(
{chr(10).join(takes)}
)
declare -A {fn}_files=(
{chr(10).join(files)}
)
declare -A {fn}_choices=(
{chr(10).join(choices) or "  [none]=''"}
)
declare -A {fn}_posfile=(
{chr(10).join(f"  [{_q([n])}]=1" for n in posfiles) or "  [none]=''"}
)

{fn}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path={prog} w i skip=0
    [[ $COMP_CWORD -gt 0 ]] && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        if [[ $skip -eq 1 ]]; then skip=0; continue; fi
        [[ $w == -- ]] && return 0
        if [[ $w == -* ]]; then
            [[ " ${{{fn}_takes[$path]}} " == *" $w "* ]] && skip=1
            continue
        fi
        if [[ " ${{{fn}_subs[$path]}} " == *" $w "* ]]; then
            path="$path $w"
        fi
    done
    if [[ $skip -eq 1 ]]; then
        local key="$path $prev"
        if [[ -n "${{{fn}_choices[$key]+x}}" ]]; then
            COMPREPLY=($(compgen -W "${{{fn}_choices[$key]}}" -- "$cur"))
        elif [[ " ${{{fn}_files[$path]}} " == *" $prev "* ]]; then
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${{{fn}_opts[$path]}}" -- "$cur"))
    elif [[ -n "${{{fn}_subs[$path]}}" ]]; then
        COMPREPLY=($(compgen -W "${{{fn}_subs[$path]}}" -- "$cur"))
    elif [[ -n "${{{fn}_choices[$path -]+x}}" ]]; then
        COMPREPLY=($(compgen -W "${{{fn}_choices[$path -]}}" -- "$cur"))
    elif [[ -n "${{{fn}_posfile[$path]+x}}" ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
    return 0
}}
complete -o filenames -o bashdefault -F {fn} {prog}
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    """zsh: the bash script through ``bashcompinit`` (same data, no second generator)."""
    return (
        "# zsh completion for multihost: the bash completion through bashcompinit.\n"
        "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash(parser)
    )


# ------------------------------------------------------------------------------ roff
def _roff(text: str) -> str:
    """Escape running text for roff (backslashes, leading dots/quotes, hyphens)."""
    out = []
    for raw in text.replace("\\", "\\e").splitlines():
        line = raw.replace("-", "\\-")
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _para(text: str) -> str:
    """A --help description: plain paragraphs filled; indented blocks kept verbatim."""
    out: list[str] = []
    block: list[str] = []
    verbatim = False

    def flush() -> None:
        nonlocal block, verbatim
        if block:
            body = _roff("\n".join(block))
            out.append(f".nf\n.RS 4\n{body}\n.RE\n.fi" if verbatim else f".PP\n{body}")
        block, verbatim = [], False

    for line in text.strip("\n").splitlines():
        if not line.strip():
            flush()
            continue
        indented = line.startswith((" ", "\t"))
        if block and indented != verbatim:
            flush()
        verbatim = indented
        block.append(line.strip() if not indented else line.rstrip())
    flush()
    return "\n".join(out)


def _usage(p: argparse.ArgumentParser) -> str:
    u = p.format_usage().strip().removeprefix("usage: ")
    return " ".join(u.split())


def _option_lines(p: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for a in _positionals(p):
        lines += [".TP", f"\\fI{_roff(a.metavar if isinstance(a.metavar, str) else a.dest)}\\fR"]
        lines.append(_roff(_help(a)))
    for a in _options(p):
        if isinstance(a, argparse._HelpAction):
            continue
        meta = ""
        if _takes_value(a):
            m = a.metavar if isinstance(a.metavar, str) else None
            if m is None and a.choices:
                m = "{" + ",".join(str(c) for c in a.choices) + "}"
            meta = " \\fI" + _roff(m or a.dest.upper()) + "\\fR"
        names = ", ".join(f"\\fB{_roff(s)}\\fR{meta}" for s in a.option_strings)
        lines += [".TP", names, _roff(_help(a))]
    return lines


def _help(a: argparse.Action) -> str:
    text = a.help or ""
    if "%(" in text:
        text = text % {"default": a.default, "prog": "multihost", "choices": a.choices}
    return text


def manpage(parser: argparse.ArgumentParser, version: str) -> str:
    """``multihost(8)``: every command's usage, description and options, from the parsers."""
    commands = [c for c in walk(parser) if c.path]
    lines = [
        '.\\" Generated from the argparse parsers by scripts/gen-docs.py; do not edit.',
        f'.TH MULTIHOST 8 "" "multihost {version}" "System Administration"',
        ".SH NAME",
        "multihost \\- active\\-active shared IP addresses for Linux clusters",
        ".SH SYNOPSIS",
        f".B {_roff(_usage(parser))}",
        ".SH DESCRIPTION",
        _para(parser.description or ""),
        ".SH OPTIONS",
        *_option_lines(parser),
        ".SH COMMANDS",
    ]
    for c in commands:
        lines += [".SS " + _roff(f"multihost {c.name}")]
        if c.help:
            lines += [".PP", _roff(c.help[0].upper() + c.help[1:] + ".")]
        lines += [".PP", f".B {_roff(_usage(c.parser))}"]
        if c.parser.description:
            lines.append(_para(c.parser.description))
        opts = _option_lines(c.parser)
        if opts:
            lines += [".PP", "Options:", ".RS 4", *opts, ".RE"]
    lines += [
        ".SH EXIT STATUS",
        "0 success, 1 the operation failed, 2 invalid input (one",
        "\\fBmultihost: error: ...\\fR line on standard error).  With \\fB\\-\\-json\\fR,",
        'exactly one JSON object on standard output, also on error: \\fB{"ok": false,',
        '"error": "...", "code": N}\\fR.',
        ".SH FILES",
        ".TP",
        "/etc/multihost/multihost.toml",
        "the cluster configuration, see \\fBmultihost.toml\\fR(5)",
        ".TP",
        "/run/multihost/control.sock",
        "the agent's control socket (\\fBstatus\\fR, \\fBdrain\\fR, \\fBwhohas\\fR)",
        ".SH SEE ALSO",
        "\\fBmultihost.toml\\fR(5), \\fBnft\\fR(8), \\fBip\\fR(8)",
        "",
    ]
    return "\n".join(lines)


def config_manpage(example: str, version: str) -> str:
    """``multihost.toml(5)``: the annotated example configuration (``contrib/``) as the
    reference: each key with its comment, verbatim."""
    return "\n".join(
        [
            '.\\" Generated from contrib/multihost.example.toml by scripts/gen-docs.py;'
            " do not edit.",
            f'.TH MULTIHOST.TOML 5 "" "multihost {version}" "File Formats"',
            ".SH NAME",
            "multihost.toml \\- multihost cluster configuration",
            ".SH DESCRIPTION",
            ".PP",
            "One TOML file, the same on every node: a \\fB[cluster]\\fR table, one",
            "\\fB[[node]]\\fR table per node (name, address, slot 0..7) and one",
            "\\fB[[traffic_ip_group]]\\fR per group of traffic IPs (addresses, members,",
            "hash), and optionally one \\fB[[backend]]\\fR per back end that routes replies",
            "back per node (\\fBmultihost backend\\-routes\\fR).",
            "\\fBmultihost check\\-config\\fR \\fIFILE\\fR runs the function the",
            "agent runs to load it; every error names the file, the key path and the",
            "reason.  Unknown keys are errors.",
            ".SH EXAMPLE",
            "The annotated example (every key, its default and meaning):",
            ".PP",
            ".nf",
            ".RS 4",
            _roff(example.rstrip("\n")),
            ".RE",
            ".fi",
            ".SH SEE ALSO",
            "\\fBmultihost\\fR(8)",
            "",
        ]
    )
