"""The Zarr v3 activation store: layout, codecs, commit record, reading back.

Why: the store is the contract every later step and every outside tool reads. One group holds
`tokens` (n_seq, seq_len) int32 and `acts/<hook>` (n_seq, seq_len, d); chunks hold whole sequences;
every chunk ends in a CRC32C checksum so a damaged chunk raises instead of returning garbage; the group
attributes hold the provenance and the commit record — the number of sequences durably written, which
only advances after their chunks are on disk. Plain `zarr.open_group` reads all of it.

bfloat16 has no numpy or Zarr v3 (zarr-python 3.1) data type, so a bfloat16 array is stored as its
uint16 bit pattern with the attribute `actstore_dtype: "bfloat16"`; `read_acts` gives float32 back.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from actstore import objstore
from actstore.errors import StoreError, UsageError

STORE_DTYPES = ("float16", "bfloat16", "float32")
LOSSLESS_CODECS = ("lz4", "zstd", "none")
DEFAULT_CODEC = "lz4"  # blosc lz4 + bit-shuffle: bench/harvest.py, see the note in README (Codecs)
DIMS = ("seq", "pos", "d")
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}


def check_codec(codec: str, dtype: str) -> None:
    """Refuse codec names we do not know, and bit-rounding that keeps no fewer bits than the dtype."""
    if codec in LOSSLESS_CODECS:
        return
    if codec.startswith("bitround-") and codec[len("bitround-") :].isdigit():
        if dtype == "bfloat16":
            raise UsageError("bitround codecs need --dtype float16 or float32 (bfloat16 is stored as raw bits)")
        keep = int(codec[len("bitround-") :])
        if not 1 <= keep < MANTISSA_BITS[dtype]:
            raise UsageError(
                f"--codec {codec} keeps {keep} mantissa bits but {dtype} has {MANTISSA_BITS[dtype]}; "
                f"use bitround-N with 1 ≤ N < {MANTISSA_BITS[dtype]}"
            )
        return
    raise UsageError(
        f"unknown --codec {codec!r}; use one of {', '.join(LOSSLESS_CODECS)} (lossless) or bitround-N "
        "(lossy: keep N mantissa bits, then zstd)"
    )


def is_lossy(codec: str) -> bool:
    return codec.startswith("bitround-")


def _bitround(keep_bits: int) -> Any:
    import warnings

    from zarr.codecs import BitRound  # numcodecs' codec, registered with zarr by numcodecs

    with warnings.catch_warnings():  # "not in the Zarr v3 spec": known, and recorded in the provenance
        warnings.simplefilter("ignore")
        return BitRound(keepbits=keep_bits)


def codec_chain(codec: str, dtype: str, typesize: int) -> tuple[list[Any], list[Any]]:
    """(filters, compressors) for zarr.create_array; the CRC32C checksum always comes last."""
    filters: list[Any] = []
    if is_lossy(codec):
        filters.append(_bitround(int(codec.split("-")[1])))
        codec = "zstd"  # rounded-off low bits are zeros, which zstd's entropy coder removes
    if codec == "lz4":
        compressors = [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize)]
    elif codec == "zstd":
        compressors = [ZstdCodec(level=1)]
    else:
        compressors = []
    return filters, compressors + [Crc32cCodec()]


def apply_lossy(codec: str, values: np.ndarray) -> np.ndarray:
    """What a lossy codec will store for `values` (the same numcodecs code zarr runs on write)."""
    from numcodecs import BitRound

    keep = int(codec.split("-")[1])
    return BitRound(keep).decode(BitRound(keep).encode(values)).view(values.dtype).reshape(values.shape)


def to_float32(values: np.ndarray, stored_dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 bit patterns widened exactly)."""
    if stored_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def to_stored(t: Any, dtype: str) -> np.ndarray:
    """A torch tensor as the numpy array a store of `dtype` holds (bfloat16 as its uint16 bits)."""
    import torch

    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).cpu().numpy()


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def create_store(
    path: str,
    *,
    n_seq: int,
    seq_len: int,
    hook_dims: dict[str, int],
    dtype: str,
    codec: str,
    chunk_seqs: int,
    shard_seqs: int | None,
    attrs: dict[str, Any],
) -> zarr.Group:
    """A new, empty store with every array allocated at its full shape and nothing committed."""
    # The attributes (settings, provenance, an empty commit record) go into the group's first write,
    # so no kill can leave a group at `path` that does not say what it is.
    attrs = {**attrs, "commit": {"n_seq": 0, "updated": now()}}
    try:
        group = zarr.create_group(path, overwrite=True, attributes=attrs, zarr_format=3)
    except OSError as exc:
        raise UsageError(f"cannot write the store at {path} ({exc.strerror or exc}); choose a writable path") from exc
    _, token_compressors = codec_chain("zstd", "int32", 4)
    shards = None if shard_seqs is None else (shard_seqs, seq_len)
    group.create_array(
        "tokens",
        shape=(n_seq, seq_len),
        chunks=(chunk_seqs, seq_len),
        shards=shards,
        dtype="int32",
        compressors=token_compressors,
        dimension_names=DIMS[:2],
        fill_value=0,
    )
    n_chunks = -(-n_seq // chunk_seqs)
    group.create_array(COMMITS, shape=(n_chunks,), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)
    acts = group.create_group("acts")
    for hook, d in hook_dims.items():
        shards = None if shard_seqs is None else (shard_seqs, seq_len, d)
        activation_array(
            acts, hook, (n_seq, seq_len, d), (chunk_seqs, seq_len, d), shards, dtype, codec, {"hook": hook}
        )
    return group


def laid_out(group: zarr.Group, hooks: list[str]) -> bool:
    """Whether every array `create_store` makes is there. A harvest killed while creating them left fewer
    and wrote into none, so its store is created afresh; a store with a commit is never (stores older than
    the chunk flags have none)."""
    if committed(group) > 0:
        return True
    names = set(group.array_keys())
    return {"tokens", COMMITS} <= names and "acts" in group and set(hooks) <= set(group["acts"].array_keys())


def stored_dtype(arr: zarr.Array) -> str:
    """The dtype an array's values mean (`bfloat16` for its uint16 bit patterns), whatever Zarr stores."""
    return str(arr.attrs.get("actstore_dtype", arr.dtype))


def activation_array(
    parent: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    shards: tuple[int, ...] | None,
    dtype: str,
    codec: str,
    attrs: dict[str, Any],
) -> zarr.Array:
    """An (n_seq, seq_len, d) array of activations of `dtype` under `codec`, replacing any at `name`."""
    np_dtype = numpy_dtype(dtype)
    filters, compressors = codec_chain(codec, dtype, np_dtype.itemsize)
    return parent.create_array(
        name,
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=np_dtype,
        filters=filters,
        compressors=compressors,
        dimension_names=DIMS,
        fill_value=0,
        overwrite=True,
        attributes={"actstore_dtype": dtype, **attrs},  # in its one metadata write: no kill leaves it unlabelled
    )


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def open_store(path: str, mode: str = "r") -> zarr.Group:
    """An existing actstore store, or a one-line error saying what is wrong with the path."""
    p = Path(path)
    if "://" not in path and not (p / "zarr.json").exists():
        raise StoreError(f"{path} is not a Zarr v3 store (no zarr.json); harvest one with `actstore harvest {path} …`")
    if objstore.is_url(path):  # fail fast and in one line: credentials, endpoint, bucket, no store there
        objstore.check(path, write=mode != "r")
        if objstore.store_settings(path) is None:
            raise StoreError(
                f"{path} is not a Zarr v3 store (no zarr.json); harvest one with `actstore harvest {path} …`"
            )
    try:
        group = zarr.open_group(path, mode=mode)
    except Exception as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from exc
    if "settings" not in group.attrs or "tokens" not in group:
        raise StoreError(f"{path} is a Zarr group but not an actstore store (no settings or tokens)")
    if TRUNCATING in group.attrs:
        _finish_for_reader(path)
        group = zarr.open_group(path, mode=mode)
    return group


TRUNCATING = "truncating_to"  # group attribute: the length every array is being cut to (an intent record)


def truncate(group: zarr.Group, n_seq: int) -> None:
    """Cut `tokens` and every `acts/` array to `n_seq` sequences, atomically in effect.

    Why an intent record: the arrays are resized one after another, so a kill in between would leave
    them of different lengths. The target length is written first; whoever opens the store next
    (`finish_truncation`: a harvest, or `open_store` for a reader) completes the cut before anything else.
    """
    group.attrs.update({TRUNCATING: int(n_seq)})
    finish_truncation(group)


def finish_truncation(group: zarr.Group) -> None:
    """Complete a pending `truncate` (resizing again is harmless), then drop the intent in the same
    write that records the new length."""
    if TRUNCATING not in group.attrs:
        return
    n_seq = int(group.attrs[TRUNCATING])
    for arr in [group["tokens"], *(group["acts"][h] for h in group["acts"].array_keys())]:
        if arr.shape[0] != n_seq:
            arr.resize((n_seq, *arr.shape[1:]))
    if COMMITS in group:
        n_chunks = -(-n_seq // chunk_seqs(group))
        if group[COMMITS].shape[0] != n_chunks:
            group[COMMITS].resize((n_chunks,))
    attrs = {k: v for k, v in group.attrs.items() if k != TRUNCATING}
    group.attrs.put({**attrs, "n_seq": n_seq, "truncated": True})


def _finish_for_reader(path: str) -> None:
    """A reader found a truncation a killed harvest left half done: finish it under the writer lock."""
    from actstore.writer_lock import exclusive

    try:
        with exclusive(path, "store", "reading it"):
            finish_truncation(zarr.open_group(path, mode="r+"))
    except (UsageError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StoreError(
            f"{path} was left half-truncated by a stopped harvest and cannot be finished now ({reason}); "
            "re-run the same `actstore harvest` command"
        ) from exc


_ZARR_TEMP = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's LocalStore writes a chunk there, then renames


def holds_only_leftovers(path: Path) -> bool:
    """True when the directory at PATH holds no file but a killed writer's temporary ones: a harvest killed
    while zarr wrote the store's first `zarr.json` leaves just `zarr.<hex>.partial`, which is no store yet."""
    return not any(f.is_file() and not _ZARR_TEMP.search(f.name) for f in path.rglob("*"))


def clear_leftovers(path: str) -> int:
    """Remove the temporary chunk files a killed writer left in the local store at PATH; how many.

    Only a writer holding the store's lock may call it: another live writer's temporary files look the same.
    Readers never see these files (zarr reads chunk keys, not directory listings), but a resumed store
    should be the same files as an uninterrupted one."""
    if "://" in path or not Path(path).is_dir():
        return 0
    gone = 0
    for f in Path(path).rglob("*.partial"):
        if _ZARR_TEMP.search(f.name) and f.is_file():
            f.unlink()
            gone += 1
    return gone


def committed(group: zarr.Group) -> int:
    """Sequences a reader may use: the prefix the commit record in the group's attributes vouches for."""
    return int(group.attrs.get("commit", {}).get("n_seq", 0))


COMMITS = "commits"  # one uint8 flag per chunk of `tokens`, each its own object, set after the chunk's data


def chunk_seqs(group: zarr.Group) -> int:
    """Sequences per chunk (the inner chunk of a sharded store)."""
    return int(group["tokens"].chunks[0])


def done_chunks(group: zarr.Group) -> np.ndarray:
    """Which chunks are durably written: flagged one by one (a writer sets a chunk's flag only after its
    data, so ranks writing disjoint chunks never touch a shared object), or inside the commit record's
    prefix (stores older than the flags, and single-process progress)."""
    n_chunks = -(-int(group["tokens"].shape[0]) // chunk_seqs(group))
    done = np.zeros(n_chunks, dtype=bool)
    if COMMITS in group:
        flags = group[COMMITS][:n_chunks].astype(bool)
        done[: len(flags)] |= flags
    prefix = committed(group) // chunk_seqs(group)
    if committed(group) >= int(group["tokens"].shape[0]):
        prefix = n_chunks
    done[:prefix] = True
    return done


def full_chunks(group: zarr.Group, start: int, stop: int) -> slice:
    """The chunks that sequences [start, stop) fill completely (the array's last chunk may be short)."""
    c, n_seq = chunk_seqs(group), int(group["tokens"].shape[0])
    last = -(-stop // c) if stop >= n_seq else stop // c
    return slice(-(-start // c), max(last, -(-start // c)))


def mark_done(group: zarr.Group, start: int, stop: int) -> None:
    """Flag the chunks sequences [start, stop) fill as written (call after their data is in the store). A
    chunk left part-filled (a corpus that ran out) is not flagged: a resume writes it again."""
    span = full_chunks(group, start, stop)
    if COMMITS in group and span.stop > span.start:
        group[COMMITS][span] = np.ones(span.stop - span.start, dtype=np.uint8)


def done_prefix(group: zarr.Group) -> int:
    """Sequences before the first chunk not yet written: what the commit record may say once they are."""
    done = done_chunks(group)
    todo = np.flatnonzero(~done)
    n_seq = int(group["tokens"].shape[0])
    return n_seq if len(todo) == 0 else min(n_seq, int(todo[0]) * chunk_seqs(group))


def commit(group: zarr.Group, n_seq: int, extra: dict[str, Any] | None = None) -> None:
    """Advance the commit record (zarr writes zarr.json atomically: write aside, then rename)."""
    group.attrs.update({"commit": {"n_seq": int(n_seq), "updated": now()}, **(extra or {})})


def hooks_of(group: zarr.Group) -> list[str]:
    """The model's hooks the store holds (not the derived arrays darkmatter adds)."""
    derived = set(derived_of(group))
    return sorted(h for h in group["acts"].array_keys() if h not in derived)


def derived_of(group: zarr.Group) -> dict[str, dict[str, Any]]:
    """Arrays of `acts/` that are not a model hook: an SAE's error and its linear and nonlinear parts
    (`actstore darkmatter --write-errors`), named `<sae_id>.<part>`, so `actstore train` can train on them."""
    return dict(group.attrs.get("derived", {}))


def acts_array(group: zarr.Group, hook: str, store: str = "this store", who: str = "") -> zarr.Array:
    """`acts/<hook>` (a hook or a derived array), or a one-line error naming what the store has (`who` says
    what asked for it)."""
    if hook not in hooks_of(group) and hook not in derived_of(group):
        asker = f"{who} reads {hook}, which" if who else f"hook {hook!r} is not in {store};"
        verb = f" {store} lacks;" if who else ""
        raise UsageError(f"{asker}{verb} it has {', '.join([*hooks_of(group), *derived_of(group)])}")
    return group["acts"][hook]


def read_acts(group: zarr.Group, hook: str, seqs: slice = slice(None)) -> np.ndarray:
    """Activations of `hook` for a slice of sequences, as float32; a damaged chunk raises StoreError."""
    arr = acts_array(group, hook)
    try:
        values = arr[seqs]
    except Exception as exc:
        raise StoreError(f"damaged chunk in acts/{hook} ({type(exc).__name__}: {exc}); re-harvest the store") from exc
    return to_float32(values, stored_dtype(arr))


def read_tokens(group: zarr.Group, seqs: slice = slice(None)) -> np.ndarray:
    try:
        return group["tokens"][seqs]
    except Exception as exc:
        raise StoreError(f"damaged chunk in tokens ({type(exc).__name__}: {exc}); re-harvest the store") from exc


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
