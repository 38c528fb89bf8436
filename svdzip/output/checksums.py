"""Checksums of a saved directory's weight files, written at save and verified at every reload.

safetensors checks a file's layout, not its bytes: a bit flipped on disk or in a copy loads silently and
gives a different model (perplexity `inf`, or worse, plausible numbers). A compressed directory therefore
carries `svdzip_checksums.json` (SHA-256 of every `*.safetensors`), and loading it refuses a mismatch in one
line. `SVDZIP_VERIFY=0` skips the check (e.g. for a very large model read many times from a trusted disk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from svdzip.assets import sha256_file
from svdzip.errors import SvdzipError

CHECKSUM_FILE = "svdzip_checksums.json"


def write_checksums(directory: Path) -> dict[str, str]:
    """Hash every weight file of `directory` (before it is moved into place) and record them there."""
    sums = {p.name: sha256_file(p, desc=f"checksum {p.name}") for p in sorted(directory.glob("*.safetensors"))}
    (directory / CHECKSUM_FILE).write_text(json.dumps({"sha256": sums}, indent=1))
    return sums


def verify_checksums(directory: Path, files: list[str] | None = None) -> None:
    """Refuse a weight file whose bytes changed since svdzip saved it (a directory without the record passes)."""
    record = Path(directory) / CHECKSUM_FILE
    if os.environ.get("SVDZIP_VERIFY", "1") == "0" or not record.is_file():
        return
    try:
        expected = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError) as exc:
        raise SvdzipError(f"{record} is unreadable ({exc}); copy the directory again or recompress") from None
    names = [Path(f).name for f in files] if files else list(expected)
    for name in names:
        if name not in expected:
            continue
        path = Path(directory) / name
        if not path.is_file():
            raise SvdzipError(f"{path} is missing: copy the directory again or recompress")
        if sha256_file(path, desc=f"verify {name}") != expected[name]:
            raise SvdzipError(f"{path} is corrupted (its SHA-256 differs from the one recorded when svdzip saved it): "
                              "copy the directory again or recompress (SVDZIP_VERIFY=0 skips this check)")
