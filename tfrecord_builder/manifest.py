"""The manifest next to the shards: what was built, from what, and how to check it.

Written last into the staging directory, so a directory with a manifest is a
complete build. Later steps (the pipeline, tests) read counts and verify
checksums through this module rather than re-counting records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"


class ManifestError(Exception):
    """The output directory is not a complete, unmodified build."""


def combined_checksum(shards: list[dict[str, Any]]) -> str:
    """SHA-256 over the shards' own SHA-256s, in file-name order."""
    digest = hashlib.sha256()
    for shard in sorted(shards, key=lambda s: s["file"]):
        digest.update(f"{shard['file']} {shard['sha256']}\n".encode())
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}: not a complete TFRecord build")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None


def all_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [shard for split in manifest["splits"].values() for shard in split["shards"]]


def verify(directory: Path | str) -> dict[str, Any]:
    """Reads the manifest and checks every shard's size and SHA-256; returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for shard in all_shards(manifest):
        path = directory / shard["file"]
        if not path.is_file():
            raise ManifestError(f"shard {shard['file']} listed in the manifest is missing")
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            raise ManifestError(f"shard {shard['file']} does not match its checksum in the manifest")
    if combined_checksum(all_shards(manifest)) != manifest["checksum"]:
        raise ManifestError("the manifest's combined checksum does not match its shards")
    return manifest
