"""``multihost completion bash|zsh``: print a shell completion script for multihost.

Must not: hold the generator (``cli.docgen`` does, from the argparse tree).
"""

from __future__ import annotations

import argparse

from multihost.cli.common import Formatter

DESCRIPTION = """\
Print a completion script generated from multihost's own argument parsers (subcommands,
options, choices, file arguments), so it always matches --help.

  eval "$(multihost completion bash)"                  # this shell
  multihost completion bash > /usr/share/bash-completion/completions/multihost
  multihost completion zsh > "${fpath[1]}/_multihost"   # zsh, via bashcompinit
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a bash or zsh completion script",
        description=DESCRIPTION,
        formatter_class=Formatter,
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multihost.cli import build_parser
    from multihost.cli.docgen import bash, zsh

    parser = build_parser()
    print(bash(parser) if args.shell == "bash" else zsh(parser), end="")
    return 0
