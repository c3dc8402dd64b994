"""`actstore info`: what a store holds, how it was made and what it costs on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actstore import store as st


def store_info(path: str) -> dict[str, Any]:
    """Shapes, dtypes, codec, bytes, compression ratio, commit record and provenance of a store."""
    group = st.open_store(path)
    attrs = dict(group.attrs)
    arrays: dict[str, Any] = {}
    local = "://" not in path
    for name, arr in [("tokens", group["tokens"])] + [(f"acts/{h}", group["acts"][h]) for h in st.hooks_of(group)]:
        logical = int(arr.nbytes)
        entry: dict[str, Any] = {
            "shape": list(arr.shape),
            "dtype": st.stored_dtype(arr),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "codecs": [c.to_dict()["name"] for c in arr.metadata.codecs],
        }
        if local:
            stored = st.bytes_on_disk(Path(path) / name)
            done = st.committed(group) / max(1, arr.shape[0])
            entry["bytes_on_disk"] = stored
            entry["compression_ratio"] = round(logical * done / stored, 3) if stored else None
        arrays[name] = entry
    return {
        "path": path,
        "committed_sequences": st.committed(group),
        "n_seq": int(group["tokens"].shape[0]),
        "seq_len": int(group["tokens"].shape[1]),
        "complete": st.committed(group) >= group["tokens"].shape[0],
        "arrays": arrays,
        "lossy_error": {
            h: {"max_rel": v["max_rel"], "rms_rel": v.get("rms_rel")} for h, v in attrs.get("lossy_error", {}).items()
        },
        "provenance": {k: v for k, v in attrs.items() if k not in ("lossy_error",)},
    }


def format_info(info: dict[str, Any]) -> str:
    """A human-readable page; `--json` prints the dict instead."""
    lines = [
        f"store        {info['path']}",
        f"committed    {info['committed_sequences']:,} / {info['n_seq']:,} sequences × {info['seq_len']} tokens"
        + ("" if info["complete"] else "  (INCOMPLETE: re-run the same harvest command to resume)")
        + ("  (truncated: the corpus ran out)" if info["provenance"].get("truncated") else ""),
    ]
    prov = info["provenance"]
    model = prov.get("model", {})
    lines.append(
        f"model        {model.get('name')} ({model.get('source')}), compute {model.get('compute_dtype')} on {model.get('device')}"
    )
    corpus = prov.get("corpus", {})
    lines.append(
        f"corpus       {corpus.get('corpus')} split={corpus.get('split')} skip_tokens={corpus.get('skip_tokens')}; {prov.get('bos_policy')}"
    )
    fp = corpus.get("fingerprint")
    if fp:
        lines.append(f"fingerprint  {_fingerprint_line(fp)}")
    codec = prov.get("codec", {})
    lines.append(
        f"codec        {codec.get('name')}{' (lossy)' if codec.get('lossy') else ''} + {codec.get('checksum')} checksum per chunk"
    )
    lines.append("arrays")
    for name, a in info["arrays"].items():
        size = a.get("bytes_on_disk")
        extra = f"  {size / 2**20:,.1f} MiB on disk, ratio {a['compression_ratio']}×" if size is not None else ""
        shards = f" shards {tuple(a['shards'])}" if a["shards"] else ""
        lines.append(
            f"  {name:<34} {str(tuple(a['shape'])):<18} {a['dtype']:<9} chunks {tuple(a['chunks'])}{shards}{extra}"
        )
    for hook, err in info["lossy_error"].items():
        lines.append(
            f"lossy error  {hook}: per-token |x'-x|/|x| max {err['max_rel']:.2e}; RMS over all values {err['rms_rel']:.2e}"
        )
    lines.append(f"actstore     {prov.get('actstore', {}).get('version')}, created {prov.get('created')}")
    return "\n".join(lines)


def _fingerprint_line(fp: dict[str, Any]) -> str:
    """The corpus fingerprint a resume checks, in a few words."""
    if fp.get("kind") == "builtin":
        return f"builtin grammar, {fp.get('n_documents'):,} documents, sample sha256 {str(fp.get('sha256'))[:12]}…"
    by = "size + sha256 per file" if fp.get("content_hashed") else "size + mtime per file"
    return f"{fp.get('n_files'):,} files, {fp.get('bytes', 0) / 2**20:,.1f} MiB ({by}), digest {str(fp.get('digest'))[:12]}…"


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, default=str)
