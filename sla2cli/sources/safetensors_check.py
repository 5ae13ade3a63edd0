"""Cheap integrity checks of safetensors files before anything loads them.

A safetensors file is an 8-byte little-endian header length, a json header giving every tensor's byte
range, then the data. A download cut short or a file damaged on disk shows up as a header that does not
parse or byte ranges that end past (or short of) the end of the file. Checking that costs one small read
per file, and it turns a deep loader traceback into one line naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from sla2cli.errors import UserError

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} is truncated or corrupted ({why}); delete it and download or convert again")


def read_header(path: Path) -> dict:
    """The parsed json header of a safetensors file, after checking that the file holds all its bytes."""
    size = path.stat().st_size
    if size < HEADER_LENGTH_BYTES:
        raise _damaged(path, f"{size} bytes, shorter than the header length field")
    with path.open("rb") as stream:
        (header_bytes,) = struct.unpack("<Q", stream.read(HEADER_LENGTH_BYTES))
        if header_bytes > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise _damaged(path, f"header claims {header_bytes} bytes")
        raw = stream.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(path, "header is not valid json") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a json object")
    end = 0
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _damaged(path, f"tensor {name} has no valid byte range")
        end = max(end, offsets[1])
    expected = HEADER_LENGTH_BYTES + header_bytes + end
    if expected != size:
        raise _damaged(path, f"expected {expected} bytes, found {size}")
    return header


def check_weight_folder(folder: Path) -> list[Path]:
    """Check every safetensors file of a diffusers component folder; return them. Pickles are refused."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        extra = f" (found {', '.join(pickled)}; sla2 never loads pickled weights)" if pickled else ""
        raise UserError(f"{folder} holds no safetensors weights{extra}")
    for index_file in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise _damaged(index_file, "not a shard index") from None
        missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
        if missing:
            raise UserError(f"{folder} lacks shards {', '.join(missing)} listed in {index_file.name}")
    for path in files:
        read_header(path)
    return files
