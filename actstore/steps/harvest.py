"""`actstore harvest`: run a model over a corpus once and write its activations to a Zarr store.

Why this shape: the model is the expensive part, so it runs once, at several hookpoints in one pass,
stopping as soon as the last hook has fired, and the thread that runs it does nothing else: converting
to the stored dtype, the finiteness check, compressing and writing happen on a background thread
(on CUDA after an asynchronous copy into pinned memory), one batch behind. Each batch is written as
whole chunks and only then counted in the commit record, so a killed harvest re-run with the same
command regenerates the (deterministic) token stream, skips what was committed and finishes
bit-identical to an uninterrupted run. The store records a fingerprint of the corpus, and a resume
refuses a corpus that changed since (its stream would not continue the committed one). When the
corpus runs out early the arrays are cut to what was written through an intent record
(`store.truncate`), so a kill mid-cut never leaves arrays of different lengths.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from actstore import __version__, atomic, diskspace, distributed, objstore
from actstore import store as st
from actstore.corpus import SPLITS, CorpusOptions, corpus_change, corpus_fingerprint, token_sequences
from actstore.errors import StoreError, UsageError
from actstore.model import (
    COMPUTE_DTYPES,
    LoadedModel,
    capture,
    check_hooks,
    check_runtime,
    hook_shape,
    load_model,
    runtime_change,
    runtime_description,
    stop_layer,
)
from actstore.options import build, csv, option, positive
from actstore.progress import token_bar
from actstore.store_writer import StoreWriter, lossy_summary
from actstore.units import parse_count
from actstore.writer_lock import exclusive


@dataclass(frozen=True)
class HarvestOptions:
    """Everything that decides a store's bytes; a resume must match all of it."""

    model: str = option(
        "tiny",
        "A shipped model ('tiny', 'tiny-192'), a local HF model directory, or a hub name (EleutherAI/pythia-70m).",
    )
    corpus: str = option(
        "builtin", "'builtin', text files/dirs/globs, .jsonl/.parquet, a saved HF dataset dir, or .npy token arrays."
    )
    hooks: tuple[str, ...] = option(
        ("blocks.1.hook_resid_post",), "Comma-separated TransformerLens hook names, captured in one pass.", parse=csv
    )
    seq_len: int = option(128, "Tokens per packed sequence (at most the model's context).")
    tokens: int = option(2_000_000, "Tokens to harvest: 2M, 500k, 1e6 …", parse=parse_count, shown="2M")
    skip_tokens: int = option(0, "Skip this many tokens of the stream first (cuts disjoint stores).", parse=parse_count)
    split: str = option("all", "Documents to use: eval = every 20th document, train = the rest.", choices=SPLITS)
    prepend_bos: bool = option(False, "Start every sequence with BOS (recorded as the BOS policy).")
    text_column: str = option("text", "Text column of JSONL/Parquet/HF dataset corpora.")
    dtype: str = option("float16", "Stored dtype of the activations.", choices=st.STORE_DTYPES)
    compute_dtype: str = option(
        "float32",
        "Dtype the model runs in (bf16 is ~3.5x faster on CPUs with AMX/AVX512-bf16 and on GPUs).",
        choices=tuple(COMPUTE_DTYPES),
    )
    codec: str = option(
        st.DEFAULT_CODEC, "lz4 | zstd | none (lossless) or bitround-N (lossy: keep N mantissa bits, then zstd)."
    )
    batch_size: int = option(32, "Sequences per forward pass.")
    chunk_seqs: int | None = option(None, "Sequences per Zarr chunk (default: the batch size; must divide it).")
    shard_seqs: int | None = option(
        None, "Group chunks into shards of this many sequences (for object storage; slower reads)."
    )
    device: str = option("cpu", "cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        if self.dtype not in st.STORE_DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(st.STORE_DTYPES)}")
        if self.split not in SPLITS:
            raise UsageError(f"unknown --split {self.split!r}; use one of {', '.join(SPLITS)}")
        st.check_codec(self.codec, self.dtype)
        if not self.hooks:
            raise UsageError("no --hooks given; name at least one, e.g. blocks.1.hook_resid_post")
        if len(set(self.hooks)) != len(self.hooks):
            raise UsageError(f"--hooks names a hook twice ({', '.join(self.hooks)}); list each once")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len {self.seq_len} is too short; use at least 2")
        if self.n_seq < 1:
            raise UsageError(f"--tokens {self.tokens} is less than one sequence of {self.seq_len}; ask for more tokens")
        positive("batch_size", self.batch_size)
        positive("skip_tokens", self.skip_tokens, minimum=0)
        positive("chunk_seqs", self.chunk_seqs, allow_none=True)
        positive("shard_seqs", self.shard_seqs, allow_none=True)
        chunk = self.chunk_seqs or self.batch_size
        if self.batch_size % chunk:
            raise UsageError(f"--chunk-seqs {chunk} must divide --batch-size {self.batch_size}")
        if self.shard_seqs is not None and self.shard_seqs % chunk:
            raise UsageError(f"--shard-seqs {self.shard_seqs} must be a multiple of the chunk ({chunk} sequences)")
        check_runtime(self.device, self.compute_dtype)

    @property
    def n_seq(self) -> int:
        return self.tokens // self.seq_len

    def settings(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["hooks"] = list(self.hooks)
        d["chunk_seqs"] = self.chunk_seqs or self.batch_size
        d["device"] = self.device.split(":")[0]  # cuda:0 and cuda:1 give the same bits
        return d

    def corpus_options(self) -> CorpusOptions:
        return CorpusOptions(
            corpus=self.corpus,
            split=self.split,
            seq_len=self.seq_len,
            skip_tokens=self.skip_tokens,
            prepend_bos=self.prepend_bos,
            text_column=self.text_column,
        )


def _check_writable(out: str) -> None:
    if "://" in out:
        return
    p = Path(out).expanduser()
    if p.is_file():
        raise UsageError(f"{out} exists and is a file; give a directory path for the store")
    parent = p if p.exists() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {out}: {parent} is not a writable directory; choose another path")


def _existing_settings(out: str, overwrite: bool) -> dict[str, Any] | None:
    """The settings of a store already at `out`, None if nothing (or an empty store) is there.

    Foreign content is refused; with `overwrite`, a Zarr group without our settings (left by a crash
    of an older version, say) counts as replaceable.
    """
    if objstore.is_url(out):  # read zarr.json itself: a failure to read is an error, never "nothing there"
        attrs = objstore.store_settings(out)
        if attrs is None or "settings" in attrs or overwrite:
            return None if attrs is None else dict(attrs.get("settings") or {"foreign": True})
        raise UsageError(f"{out} is a Zarr group but not an actstore store; use another URL")
    p = Path(out)
    if not p.exists() or st.holds_only_leftovers(p):  # creating it overwrites what is there
        return None
    if not (p / "zarr.json").exists():
        raise UsageError(f"{out} exists and is not an actstore store; choose an empty or new path")
    try:
        attrs = dict(zarr.open_group(out, mode="r").attrs)
    except Exception as exc:
        raise StoreError(f"cannot read the store at {out} ({exc}); use --overwrite or another path") from exc
    if "settings" not in attrs:
        if overwrite:
            return {"foreign": True}
        raise UsageError(f"{out} is a Zarr group but not an actstore store; use --overwrite or another path")
    return dict(attrs["settings"])


def _stored_finite(hook: str, acts: torch.Tensor, dtype: str, seq: int, stored: np.ndarray | None = None) -> np.ndarray:
    """A batch's activations in the stored dtype, or a one-line error when a value is not finite there:
    float16 turns anything beyond ±65,504 into ±inf (Gemma-2's residual stream gets there), and training
    and eval would turn it into NaN much later. Batches before it are committed: the store stays resumable.
    `stored`: the values already converted (and copied off the device), when they were."""
    if stored is None:
        stored = st.to_stored(acts.reshape(*acts.shape[:2], -1), dtype)
    bits = stored.view(np.uint16) if dtype == "bfloat16" else None
    ok = ((bits & 0x7F80) != 0x7F80).all() if bits is not None else np.isfinite(stored).all()
    if ok:
        return stored
    if not torch.isfinite(acts).all():
        raise StoreError(
            f"the model produced NaN or inf at {hook} in sequences {seq}…{seq + len(acts) - 1}; check its weights and --compute-dtype"
        )
    peak = float(acts.float().abs().max())
    raise StoreError(
        f"activations at {hook} reach {peak:.4g} in sequences {seq}…{seq + len(acts) - 1}, beyond what {dtype} holds; "
        "harvest into a new store with --dtype bfloat16 (or float32)"
    )


def _off_device(acts: dict[str, torch.Tensor], dtype: str, seq: int) -> Callable[[], dict[str, np.ndarray]]:
    """Start taking a batch's activations to the host; the function returned, run on the writer thread,
    finishes: the forward pass's thread goes straight on to the next batch.

    On CPU the conversion to the stored dtype and the finiteness check move to the writer. On CUDA the
    conversion runs on the device (half the bytes to copy for float16), the copy into pinned memory does
    not block, and the writer waits on an event recorded after it: the GPU is never idle for the copy.
    The bits are those of `store.to_stored` either way."""
    if not any(a.is_cuda for a in acts.values()):
        return lambda: {h: _stored_finite(h, a, dtype, seq, _stored_serially(a, dtype)) for h, a in acts.items()}
    host = {h: _pinned_copy(a, dtype) for h, a in acts.items()}
    copied = torch.cuda.Event()
    copied.record()

    def finish() -> dict[str, np.ndarray]:
        copied.synchronize()
        return {h: _stored_finite(h, acts[h], dtype, seq, _host_values(host[h], dtype)) for h in acts}

    return finish


SERIAL_ELEMENTS = 32767  # torch runs an op on fewer elements than its grain (32,768) on the calling thread


def _stored_serially(acts: torch.Tensor, dtype: str) -> np.ndarray | None:
    """`store.to_stored`, in pieces small enough that torch runs each on the calling thread.

    Why: torch gives every thread that runs a parallel op a thread team of its own, so a whole-batch
    conversion on the writer thread would put a second team beside the forward pass's on the same cores.
    None for a tensor that is not contiguous (`to_stored` then converts it whole)."""
    target = getattr(torch, dtype)
    if acts.dtype == target or not acts.is_contiguous():
        return None
    flat = acts.reshape(-1)
    out = torch.empty(flat.shape, dtype=target)
    for start in range(0, len(flat), SERIAL_ELEMENTS):
        out[start : start + SERIAL_ELEMENTS].copy_(flat[start : start + SERIAL_ELEMENTS])
    return _host_values(out.reshape(*acts.shape[:2], -1), dtype)


def _pinned_copy(acts: torch.Tensor, dtype: str) -> torch.Tensor:
    """Convert on the device and enqueue the copy into page-locked host memory (asynchronous)."""
    values = acts.reshape(*acts.shape[:2], -1).to(getattr(torch, dtype))
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def _host_values(host: torch.Tensor, dtype: str) -> np.ndarray:
    """What `store.to_stored` gives for these values (bfloat16 as its uint16 bits)."""
    return host.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else host.numpy()


def harvest(
    out: str,
    options: HarvestOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    loaded: LoadedModel | None = None,
    **kwargs: Any,
) -> str:
    """Harvest activations into the store at `out` (resuming it if it holds the same settings).

    Keyword options are those of `HarvestOptions` (hooks as a list or a comma-separated string,
    token counts as ints or strings like "2M"). `loaded` reuses a model already booted with the same
    name, device and compute dtype (notebooks, benchmarks). With `overwrite`, a store of other settings
    is replaced only once the new one is complete: the new one grows beside it and is swapped in.

    Under torchrun (WORLD_SIZE > 1) every rank runs this with the same arguments: rank 0 prepares the
    store, each rank writes its share of whole work units, rank 0 records the commit and finishes.
    Holds the writer lock of what it writes (actstore/writer_lock.py, on rank 0): a second writer is refused.
    """
    o = options or build(HarvestOptions, kwargs)
    objstore.check_store_target(out, overwrite)  # a URL: fail fast (credentials, endpoint, bucket)
    w = distributed.init(o.device)
    with ExitStack() as held:
        distributed.agreed(lambda: held.enter_context(exclusive(out, "store", "actstore harvest")), w, True)
        with diskspace.guard(out, lambda: remaining_bytes(out)):
            result = _harvest(out, o, w, overwrite=overwrite, progress=progress, loaded=loaded)
    distributed.finish(w)
    return result


def remaining_bytes(out: str) -> int | None:
    """What the store at OUT (or its replacement being built) still has to write, uncompressed: an upper
    bound for lossless codecs, which gain little on activations."""
    for path in (str(atomic.staged(Path(out.rstrip("/")))), out):
        try:
            group = zarr.open_group(path, mode="r")
            n_seq, seq_len = group["tokens"].shape
        except Exception:
            continue
        per_token = 4 + sum(
            int(group["acts"][h].shape[2]) * group["acts"][h].dtype.itemsize for h in st.hooks_of(group)
        )
        return (n_seq - st.committed(group)) * seq_len * per_token
    return None


def _prepare(out: str, o: HarvestOptions, overwrite: bool, progress: bool) -> tuple[str, str]:
    """Where this harvest writes and what is there: ("new" | "resume" | "complete", target path).

    The store first, the model after: a complete store needs no model, a changed corpus fails fast."""
    settings = o.settings()
    _check_writable(out)
    existing = _existing_settings(out, overwrite)
    target = out
    if existing is not None and existing != settings:
        if not overwrite:
            diff = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
            raise StoreError(
                f"{out} holds a store harvested with other settings ({', '.join(diff)}); "
                "use --overwrite to replace it or choose another path"
            )
        target = str(atomic.staged(Path(out.rstrip("/"))))  # the old store stays until the new one is done
    group = None
    if _existing_settings(target, overwrite=True) == settings:
        group = zarr.open_group(target, mode="r+")
        st.clear_leftovers(target)  # a killed writer's half-written chunk files (we hold the lock)
        if not st.laid_out(group, list(o.hooks)):  # killed while its arrays were being created: nothing written
            group = None
    if group is None:
        return "new", target
    st.finish_truncation(group)  # a harvest killed while cutting the arrays to the corpus's length
    if st.committed(group) >= group["tokens"].shape[0]:
        _say(progress, f"{target}: already complete ({st.committed(group)} sequences)")
        return "complete", target
    started = bool(st.done_chunks(group).any())
    if started and not _same_corpus(out, group, o.corpus, overwrite):
        return "new", str(atomic.staged(Path(out.rstrip("/"))))  # --overwrite: harvest afresh beside it
    recorded = dict(group.attrs.get("model", {})).get("runtime") or {}  # none in stores of older versions
    if not started:  # nothing read from the corpus yet: record it (and what computes it) as it is now
        group.attrs["corpus"] = {**o.corpus_options().to_dict(), "fingerprint": corpus_fingerprint(o.corpus)}
        group.attrs["model"] = {**group.attrs.get("model", {}), "runtime": runtime_description(o.device)}
    elif change := runtime_change(recorded, runtime_description(o.device)):
        # warned, not refused: refusing would leave a store unresumable after a torch upgrade
        print(
            f"warning: resuming {target} on another runtime than the one that started it ({change}); a resumed store "
            "is bit-identical to an uninterrupted harvest only on the same hardware and versions",
            file=sys.stderr,
        )
    return "resume", target


def _harvest(
    out: str,
    o: HarvestOptions,
    w: distributed.World,
    *,
    overwrite: bool = False,
    progress: bool = False,
    loaded: LoadedModel | None = None,
) -> str:
    """The work of `harvest`, under its writer lock."""
    out = _local_path(out)
    distributed.same_everywhere({"out": out, "overwrite": overwrite, **o.settings()}, w, "actstore harvest")
    # Work units: whole batches (one process), or whole batches that are also whole shards (several ranks,
    # so no two ranks ever rewrite one object). The batches are those of one process, so are the bits.
    unit = o.batch_size if w.single else math.lcm(o.batch_size, o.shard_seqs or o.batch_size)
    n_units = -(-o.n_seq // unit)
    distributed.agreed(
        lambda: distributed.check_world_fits(
            n_units, w, f"work units in the store (chunk-aligned batches of {unit} sequences)"
        ),
        w,
    )
    state, target = distributed.broadcast(
        distributed.agreed(lambda: _prepare(out, o, overwrite, progress), w, leader_only=True), w
    )
    if state == "complete":
        if w.leader:
            _finish(out, target)
        distributed.barrier(w)
        return out

    device = distributed.rank_device(o.device, w)
    model = loaded or load_model(o.model, device, o.compute_dtype)
    if (model.name, model.device, model.compute_dtype) != (o.model, device, o.compute_dtype):
        raise UsageError("the loaded model does not match the options' model, device or compute dtype")
    hooks = list(o.hooks)
    check_hooks(model, hooks)
    if o.seq_len > model.n_ctx:
        raise UsageError(
            f"--seq-len {o.seq_len} is longer than {o.model}'s context of {model.n_ctx}; use at most {model.n_ctx}"
        )
    if state == "new":
        distributed.agreed(lambda: _create_from_corpus(target, o, model, hooks), w, leader_only=True)
    distributed.barrier(w)
    group = zarr.open_group(target, mode="r+")

    chunk = st.chunk_seqs(group)
    done = st.done_chunks(group)
    todo = [u for u in range(n_units) if not done[u * unit // chunk : -(-min((u + 1) * unit, o.n_seq) // chunk)].all()]
    mine = set(w.mine(todo))
    lossy = {}
    if w.single and done.any():  # sums are only valid up to the batch boundary we restart from
        lossy = {h: dict(v) for h, v in group.attrs.get("lossy_error", {}).items()}
        for acc in lossy.values():
            acc.pop("rms_rel", None)
    ended_at = _write_units(group, o, model, hooks, sorted(mine), unit, lossy, w, progress)

    ends = distributed.gather(ended_at, w)
    sums = distributed.gather(lossy, w)
    if w.leader:
        end = min((e for e in ends if e is not None), default=None)
        _record_commit(group, end, sums)  # also a single writer's, if killed between its flags and its record
        if end is not None and end < o.n_seq:
            st.truncate(group, end)
            print(
                f"warning: the corpus ran out after {end} sequences ({end * o.seq_len} tokens); the store holds those",
                file=sys.stderr,
            )
        _finish(out, target)
    distributed.barrier(w)
    return out


def _write_units(
    group: Any,
    o: HarvestOptions,
    model: LoadedModel,
    hooks: list[str],
    units: list[int],
    unit: int,
    lossy: dict[str, Any],
    w: distributed.World,
    progress: bool,
) -> int | None:
    """Run the model over this rank's units and write them; where the corpus ended, if before the store's end.

    Every rank reads the same token stream (tokenizing is cheap beside the forward) and keeps its own batches."""
    writer = StoreWriter(group, hooks, o.codec, lossy, record_commit=w.single)
    writer.start()
    total = (o.n_seq * o.seq_len) if w.single else len(units) * unit * o.seq_len
    initial = (o.n_seq - len(units) * unit) * o.seq_len if w.single else 0
    bar = token_bar(
        progress and w.leader,
        total,
        "harvest" if w.single else f"harvest (rank 0 of {w.size})",
        initial=max(0, initial),
    )
    wanted = set(units)
    start = units[0] * unit if units else o.n_seq
    stop = min(o.n_seq, (units[-1] + 1) * unit) if units else o.n_seq
    seq, ended_at = start, None
    try:
        batches = token_sequences(o.corpus_options(), model.tokenizer, start_seq=start, batch_seqs=o.batch_size)
        while seq < stop:
            batch = next(batches, None)
            if batch is None:
                ended_at = seq
                break
            batch = batch[: o.n_seq - seq]
            if seq // unit in wanted:
                _check_vocab(batch, model)
                tokens = torch.from_numpy(batch.astype(np.int64)).to(model.device)
                writer.put((seq, batch, _off_device(capture(model, tokens, hooks), o.dtype, seq)))
                if bar is not None:
                    bar.update(batch.size)
            seq += len(batch)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return ended_at


def _record_commit(group: Any, end: int | None, sums: list[dict[str, Any]]) -> None:
    """Rank 0, once every rank is done: the commit record readers trust (the prefix of chunks flagged done,
    through a short last chunk where the corpus ended) and the lossy codec's error, summed over ranks."""
    prefix = st.done_prefix(group)
    chunk = st.chunk_seqs(group)
    if end is not None and prefix >= end - end % chunk:
        prefix = max(prefix, end)
    merged: dict[str, Any] = {}
    for part in sums:
        for hook, acc in part.items():
            m = merged.setdefault(hook, {"err_sq": 0.0, "x_sq": 0.0, "max_rel": 0.0})
            m["err_sq"] += acc["err_sq"]
            m["x_sq"] += acc["x_sq"]
            m["max_rel"] = max(m["max_rel"], acc["max_rel"])
    st.commit(group, prefix, {"lossy_error": lossy_summary(merged)} if merged else None)


def _create_from_corpus(target: str, o: HarvestOptions, model: LoadedModel, hooks: list[str]) -> None:
    """Allocate a new store, after checking the corpus gives at least one sequence of the model's vocabulary."""
    first = next(token_sequences(o.corpus_options(), model.tokenizer, start_seq=0, batch_seqs=o.batch_size), None)
    if first is None:
        raise UsageError(
            f"corpus {o.corpus!r} (split {o.split}, skipping {o.skip_tokens} tokens) gives no full sequence "
            f"of {o.seq_len} tokens; give a larger corpus or a smaller --seq-len/--skip-tokens"
            + (" (splits are by document: a one-document corpus has no eval split)" if o.split != "all" else "")
        )
    _check_vocab(first, model)
    _create(target, o, model, hooks, corpus_fingerprint(o.corpus))


def _same_corpus(out: str, group: Any, corpus: str, overwrite: bool) -> bool:
    """Whether a store being resumed was harvested from the corpus as it is now (stores of older versions
    record no fingerprint: resumed with a warning). A changed corpus is refused unless `overwrite`."""
    recorded = dict(group.attrs.get("corpus", {})).get("fingerprint")
    if recorded is None:
        print(
            f"warning: {out} records no corpus fingerprint (an older actstore wrote it); "
            f"resuming without checking that {corpus!r} is unchanged",
            file=sys.stderr,
        )
        return True
    change = corpus_change(recorded, corpus)
    if change is None:
        return True
    if overwrite:
        return False
    raise StoreError(
        f"{out} cannot resume: its corpus changed since the harvest started ({change}); "
        "restore the corpus, or use --overwrite (or another path) to harvest afresh"
    )


def _local_path(out: str) -> str:
    return out[len("file://") :] if out.startswith("file://") else out


def _finish(out: str, target: str) -> str:
    """Swap a completed replacement store into place (the old one is removed only now)."""
    if target != out:
        atomic.swap_in(Path(target), Path(out))
    return out


def _check_vocab(first: np.ndarray, model: LoadedModel) -> None:
    vocab = int(model.bridge.cfg.d_vocab)
    if first.max() >= vocab or first.min() < 0:
        raise UsageError(f"the corpus has token ids outside 0…{vocab - 1}; was it tokenized for another model?")


def _create(out: str, o: HarvestOptions, model: LoadedModel, hooks: list[str], fingerprint: dict[str, Any]) -> Any:
    """Allocate the store; the hooks' shapes are those the model's hook survey found (no forward pass here)."""
    shapes = {h: hook_shape(model, h) for h in hooks}
    hook_dims = {h: int(np.prod(shape)) for h, shape in shapes.items()}
    attrs = {
        "actstore": {"version": __version__, "store_schema": 1},
        "settings": o.settings(),
        "model": {
            "name": o.model,
            "source": model.source,
            "config": model.config_summary(),
            "compute_dtype": o.compute_dtype,
            "device": o.device,
            "runtime": runtime_description(model.device),  # settings say "cuda"; this says which GPU and versions
        },
        "corpus": {**o.corpus_options().to_dict(), "fingerprint": fingerprint},
        "bos_policy": "prepend BOS to every sequence"
        if o.prepend_bos
        else "packed, documents separated by end-of-text",
        "hooks": {h: {"d": hook_dims[h], "shape": list(shapes[h]), "stop_at_layer": stop_layer(hooks)} for h in hooks},
        "dtype": o.dtype,
        "codec": {"name": o.codec, "lossy": st.is_lossy(o.codec), "checksum": "crc32c"},
        "n_seq": o.n_seq,
        "seq_len": o.seq_len,
        "created": st.now(),
    }
    return st.create_store(
        out,
        n_seq=o.n_seq,
        seq_len=o.seq_len,
        hook_dims=hook_dims,
        dtype=o.dtype,
        codec=o.codec,
        chunk_seqs=o.chunk_seqs or o.batch_size,
        shard_seqs=o.shard_seqs,
        attrs=attrs,
    )


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr)
