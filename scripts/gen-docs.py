#!/usr/bin/env python3
"""Write the generated docs: man pages and shell completion, from the argparse parsers.

  docs/man/multihost.8            multihost(8): every command, from the parsers (= --help)
  docs/man/multihost.toml.5       multihost.toml(5): from contrib/multihost.example.toml
  contrib/completion/multihost.bash   bash completion (= 'multihost completion bash')
  contrib/completion/_multihost       zsh completion (= 'multihost completion zsh')

Run by 'make docs'; tests/unit/test_docgen.py fails when a file is out of date.
'--check' only reports stale files (exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

from multihost import __version__
from multihost.cli import build_parser
from multihost.cli.docgen import bash, config_manpage, manpage, zsh

ROOT = Path(__file__).resolve().parent.parent


def generated() -> dict[Path, str]:
    parser = build_parser()
    example = (ROOT / "contrib" / "multihost.example.toml").read_text(encoding="utf-8")
    return {
        ROOT / "docs" / "man" / "multihost.8": manpage(parser, __version__),
        ROOT / "docs" / "man" / "multihost.toml.5": config_manpage(example, __version__),
        ROOT / "contrib" / "completion" / "multihost.bash": bash(parser),
        ROOT / "contrib" / "completion" / "_multihost": zsh(parser),
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = 0
    for path, text in generated().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale += 1
        if check:
            print(f"{path.relative_to(ROOT)}: out of date (run 'make docs')", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
