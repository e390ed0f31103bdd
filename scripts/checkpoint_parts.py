"""Split a safetensors file into parts of at most ``--max-mib`` each, and join them back (issue 11).

A resumable DisDiff checkpoint (model + AdamW moments, ~33 MB for the toy world) is larger than what
one file from the device machine's $OUT may be (16 MiB), so a long GPU training that resumes in the
next call writes its checkpoint as parts and the next call joins them:

    python scripts/checkpoint_parts.py split out/disdiff/seed0.safetensors $OUT --max-mib 15
    python scripts/checkpoint_parts.py join $FILES_AT/seed0.part*.safetensors out/disdiff/seed0.safetensors

Each part is itself a safetensors file holding whole tensors (none is cut); part 0 also carries the
original metadata. Join checks that the parts belong together (same id, all present) and restores
the tensors bit for bit and the metadata exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import uuid

PART_KEY = "checkpoint_parts"   # metadata key of every part: {"id", "index", "count", "name"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def plan_parts(sizes: dict, max_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into parts whose data stay within ``max_bytes`` (a tensor larger
    than that gets a part of its own)."""
    parts, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            parts.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        parts.append(current)
    return parts


def split(path: str, out_dir: str, max_mib: float = 15.0) -> list[str]:
    """Write ``<stem>.partK.safetensors`` files into ``out_dir``; returns their paths."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    headroom = 1 << 20   # safetensors header and alignment
    groups = plan_parts({k: _nbytes(v) for k, v in tensors.items()}, int(max_mib * (1 << 20)) - headroom)
    stem = os.path.splitext(os.path.basename(path))[0]
    ident = uuid.uuid4().hex
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, names in enumerate(groups):
        tag = {"id": ident, "index": i, "count": len(groups), "name": os.path.basename(path)}
        meta = {PART_KEY: json.dumps(tag)}
        if i == 0:
            meta["original_metadata"] = json.dumps(metadata)
        out = os.path.join(out_dir, f"{stem}.part{i}.safetensors")
        save_file({k: tensors[k].contiguous() for k in names}, out, metadata=meta)
        paths.append(out)
    return paths


def join(parts: list[str], out_path: str) -> str:
    """Rebuild the original file from all its parts (any order); atomic (tmp + rename)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    tensors, tags, metadata = {}, {}, None
    for p in parts:
        with safe_open(p, framework="pt") as f:
            meta = f.metadata() or {}
            if PART_KEY not in meta:
                raise ValueError(f"{os.path.basename(p)} is not a checkpoint part")
            tag = json.loads(meta[PART_KEY])
            tags[tag["index"]] = tag
            if tag["index"] == 0:
                metadata = json.loads(meta["original_metadata"])
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    ids = {t["id"] for t in tags.values()}
    counts = {t["count"] for t in tags.values()}
    if len(ids) != 1 or len(counts) != 1:
        raise ValueError("the parts come from different checkpoints")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(tags))
    if missing or len(parts) != count:
        raise ValueError(f"parts {missing} of {count} are missing" if missing else "a part was given twice")
    tmp = f"{out_path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, out_path)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("path")
    s.add_argument("out_dir")
    s.add_argument("--max-mib", type=float, default=15.0)
    j = sub.add_parser("join")
    j.add_argument("parts", nargs="+")
    j.add_argument("out_path")
    args = p.parse_args(argv)
    if args.command == "split":
        for path in split(args.path, args.out_dir, args.max_mib):
            print(path, os.path.getsize(path))
    else:
        print(join(args.parts, args.out_path))


if __name__ == "__main__":
    main()
