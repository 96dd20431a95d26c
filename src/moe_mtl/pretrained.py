"""Where a pretrained part (a model, a tokenizer) is read from: a local folder, or a hub name.

`from_pretrained` takes a string that names no local folder for a hub id, so a mistyped folder ends, dozens of lines
later, in a hub error ("Repo id must be in the form …"). `check_pretrained` answers first, in one line naming the
option: a missing folder, a file where a folder was expected, or a folder without the part.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError

# what a hub id looks like: `name` or `namespace/name` (letters, digits, '-', '_', '.')
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# the files that make a folder hold each kind of part
PART_FILES = {
    "model": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.json"),
}


def check_pretrained(value: str | Path | None, option: str, part: str = "model") -> None:
    """A UsageError naming `option` unless `value` is None, a folder holding a `part` (`PART_FILES`), or a string
    that can only be a hub name (it names nothing on disk and has a hub id's form)."""
    if value is None:
        return
    text, path = str(value), Path(value).expanduser()
    files = PART_FILES[part]
    saved = f"a folder written by save_pretrained (with {' or '.join(files)})"
    if path.is_dir():
        if not any((path / name).is_file() for name in files):
            found = sorted(child.name for child in path.iterdir())[:5]
            raise UsageError(
                f"{option} is {text}, a folder without a {part} (no {' or '.join(files)}; found: "
                f"{found or 'nothing'}); give {saved}"
            )
        return
    if path.exists():
        raise UsageError(f"{option} is {text}, a file where a folder is expected; give {saved}")
    if text.startswith((".", "/", "~")) or not HUB_ID.fullmatch(text):
        raise UsageError(f"{option} is {text}: no such folder; give {saved}, or a hub name (facebook/bart-base)")
