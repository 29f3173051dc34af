"""Keyword search over folders of local text files, confined to the folders it was given.

What it owns: ``FileSearch`` — ``search_files`` (ranked matching lines) and
``read_text_file`` (one file's text) over a fixed set of root folders, meant
to be registered as tools (tools/builtin.py does).

Invariant: nothing outside the roots is ever opened or listed. Every path a
caller names is refused if it is absolute or has a ``..`` part, then resolved
(symlinks followed) and refused unless the result is still inside its root;
the walk does not descend into symlinked folders, and each file is resolved
and checked again before it is opened (so a symlink inside a root that points
out of it is skipped). Roots themselves are resolved once, when constructed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".csv", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg",
                      ".log", ".py", ".html", ".xml")
MAX_FILE_BYTES = 2_000_000
MAX_FILES = 20_000       # a search stops walking after this many files
MAX_RESULTS = 50
SNIPPET_CHARS = 240


class PathOutsideRoots(ValueError):
    """A requested path is outside every search root (or tries to be)."""


def _walk(start: Path) -> Iterable[Path]:
    """Files under ``start`` in a stable order, never descending into symlinked folders."""
    for d, dirs, files in os.walk(start, followlinks=False):
        dirs.sort()  # os.walk recurses in this list's order
        for f in sorted(files):
            yield Path(d) / f


class FileSearch:
    def __init__(self, roots: Iterable[str | Path], *, extensions: Iterable[str] = DEFAULT_EXTENSIONS,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
        resolved = []
        for r in roots:
            p = Path(r).expanduser().resolve(strict=True)
            if not p.is_dir():
                raise NotADirectoryError(f"search root is not a folder: {r}")
            resolved.append(p)
        if not resolved:
            raise ValueError("FileSearch needs at least one root folder")
        self.roots = resolved
        # Paths shown to the model are "<label>/<relative path>"; labels are the
        # roots' folder names, made unique.
        self.labels: dict[str, Path] = {}
        for p in resolved:
            label, k = p.name or "root", 2
            while label in self.labels:
                label, k = f"{p.name or 'root'}-{k}", k + 1
            self.labels[label] = p
        self.extensions = tuple(e.lower() for e in extensions)
        self.max_file_bytes = max_file_bytes

    # ---------------------------------------------------------------- confinement

    @staticmethod
    def _inside(path: Path, root: Path) -> bool:
        return path == root or path.is_relative_to(root)

    def resolve(self, relative: str) -> tuple[str, Path, Path]:
        """``"<label>/<sub path>"`` (or ``"."`` for all roots' first) → (label, root, resolved path).

        Raises PathOutsideRoots for absolute paths, ``..`` parts, unknown labels
        and anything that resolves (through symlinks) outside its root.
        """
        text = (relative or ".").strip().replace("\\", "/")
        pure = PurePosixPath(text)
        if pure.is_absolute() or text.startswith("~") or re.match(r"^[A-Za-z]:", text):
            raise PathOutsideRoots(f"'{relative}' is absolute; give a path relative to the search folders")
        if ".." in pure.parts:
            raise PathOutsideRoots(f"'{relative}' leaves the search folders ('..' is not allowed)")
        parts = [p for p in pure.parts if p != "."]
        if len(self.labels) == 1 and (not parts or parts[0] not in self.labels):
            label = next(iter(self.labels))  # one root: its label is optional
        elif parts and parts[0] in self.labels:
            label, parts = parts[0], parts[1:]
        else:
            raise PathOutsideRoots(f"'{relative}' is not in a search folder; folders: {', '.join(self.labels)}")
        root = self.labels[label]
        target = root.joinpath(*parts).resolve(strict=False)
        if not self._inside(target, root):
            raise PathOutsideRoots(f"'{relative}' resolves outside the search folders")
        return label, root, target

    def _files(self, label: str, root: Path, start: Path) -> Iterable[tuple[str, Path]]:
        """(shown path, resolved file) for every searchable file under ``start``."""
        for path in ([start] if start.is_file() else _walk(start)):
            if not path.name.lower().endswith(self.extensions):
                continue
            real = path.resolve(strict=False)
            if not self._inside(real, root) or not real.is_file():
                continue  # a symlink pointing out of the root (or dangling)
            yield f"{label}/{real.relative_to(root).as_posix()}", real

    def _read(self, real: Path) -> str | None:
        # O_NOFOLLOW: ``real`` is already resolved, so a symlink here means it was
        # swapped in after the check; refuse it rather than follow it.
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes or b"\x00" in data[:4096]:
            return None  # too big to scan, or binary
        return data.decode("utf-8", errors="replace")

    # ---------------------------------------------------------------- the tools

    def search_files(self, query: str, folder: str = ".", max_results: int = 5) -> dict[str, Any]:
        """Search local text files for lines containing keywords, best matches first.

        Args:
            query: words to look for, case-insensitive, e.g. "refund policy"
            folder: a sub-folder to search, relative to the search folders; "." searches everything
            max_results: how many matching lines to return, 1 to 50
        """
        terms = [t for t in re.findall(r"\w+", query.lower()) if t]
        if not terms:
            raise ValueError("the query has no words to search for")
        if not 1 <= max_results <= MAX_RESULTS:
            raise ValueError(f"max_results must be between 1 and {MAX_RESULTS}")
        scopes = ([self.resolve(label) for label in self.labels] if folder.strip() in ("", ".")
                  else [self.resolve(folder)])
        hits: list[tuple[int, str, int, str]] = []
        searched = 0
        for label, root, start in scopes:
            if not start.exists():
                raise ValueError(f"no such folder: '{folder}'")
            for shown, real in self._files(label, root, start):
                if searched >= MAX_FILES:
                    break
                searched += 1
                text = self._read(real)
                if text is None:
                    continue
                for lineno, line in enumerate(text.splitlines(), 1):
                    low = line.lower()
                    score = sum(low.count(t) for t in terms)
                    if score:
                        # Lines holding more of the distinct terms rank first.
                        distinct = sum(1 for t in terms if t in low)
                        hits.append((distinct * 1000 + score, shown, lineno, line.strip()[:SNIPPET_CHARS]))
        hits.sort(key=lambda h: (-h[0], h[1], h[2]))
        return {"query": query, "files_searched": searched,
                "matches": [{"path": p, "line": n, "text": t} for _, p, n, t in hits[:max_results]]}

    def read_text_file(self, path: str, max_chars: int = 4000) -> str:
        """Read a local text file found by search_files.

        Args:
            path: the file's path as search_files shows it, e.g. docs/faq.md
            max_chars: return at most this many characters, 1 to 20000
        """
        if not 1 <= max_chars <= 20_000:
            raise ValueError("max_chars must be between 1 and 20000")
        label, root, target = self.resolve(path)
        files = list(self._files(label, root, target)) if target.is_file() else []
        if not files:
            raise ValueError(f"no readable text file at '{path}'")
        text = self._read(files[0][1])
        if text is None:
            raise ValueError(f"'{path}' is binary or larger than {self.max_file_bytes} bytes")
        return text if len(text) <= max_chars else text[:max_chars] + f"\n[truncated at {max_chars} characters]"
