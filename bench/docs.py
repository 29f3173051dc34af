"""The generated blocks of docs/benchmarks.md: each bench script owns one block in its section.

`write_generated` puts a script's text between its markers in its section and keeps the
rest: hand-written findings around the block, and every other section. A missing section
is appended, a missing file created.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import time
from pathlib import Path


def markers(owner: str) -> tuple[str, str]:
    return f"<!-- {owner}: generated, do not edit -->", f"<!-- {owner}: end -->"


def write_generated(path: Path, section: str, owner: str, generated: str) -> None:
    begin, end_mark = markers(owner)
    block = f"{begin}\n{generated.strip()}\n{end_mark}"
    doc = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = doc.find(section + "\n")
    if start < 0:
        doc = doc.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    else:
        nxt = re.search(r"^## ", doc[start + len(section):], flags=re.M)
        end = start + len(section) + nxt.start() if nxt else len(doc)
        body = doc[start:end]
        if begin in body and end_mark in body:
            body = body[: body.index(begin)] + block + body[body.index(end_mark) + len(end_mark):]
        else:
            body = body.rstrip("\n") + f"\n\n{block}\n"
        doc = doc[:start] + body.rstrip("\n") + "\n" + ("\n" + doc[end:] if nxt else "")
    path.write_text(doc, encoding="utf-8")


def write_run(path: Path, section: str, module: str, setup: str, body: str, started: float) -> None:
    """The generated block of one bench run: the command that made it, when and how long
    (`started` is a time.monotonic() reading), what was measured (`setup`), the table."""
    cmd = "`" + " ".join([f".venv/bin/python -m {module}", *sys.argv[1:]]) + "`"
    minutes = (time.monotonic() - started) / 60
    write_generated(path, section, module, f"Command: {cmd} (measured {dt.date.today()}, {minutes:.0f} min on "
                                           f"the 2-core machine).\n\n{setup}\n\n{body}")
    print(f"wrote {path}")
