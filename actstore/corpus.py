"""Corpora in, fixed-length token sequences out: read documents, tokenize, pack, split.

Why: a store must record exactly which tokens the model saw, and a train and an eval store must never
share a document. Everything here is deterministic: the same spec, tokenizer and options give the same
sequences on every machine, so an interrupted harvest can regenerate the stream and skip what it wrote.

Packing: each text document is tokenized, followed by the end-of-text token, and the documents are
concatenated into one stream cut into `seq_len` pieces (Pythia's packing). Pre-tokenized documents are
concatenated as they are. With `prepend_bos`, each sequence is a BOS token plus `seq_len - 1` stream
tokens. Splits are by document: document i belongs to `eval` when i % 20 == 19, to `train` otherwise,
so the two are disjoint whatever token counts are harvested from each.

Fingerprint: a store records what its corpus was (`corpus_fingerprint`) so a resume can refuse a corpus
that changed under it (the regenerated stream would no longer continue the committed one). For
`builtin` it is a digest of a sample of the generated documents; for files it is each resolved file's
path, size and mtime, plus its sha256 when the corpus totals at most 64 MiB, in which case the content
decides and a file that was only touched still matches.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actstore.errors import UsageError
from actstore.integrity import digest

SPLITS = ("all", "train", "eval")
EVAL_EVERY = 20  # document i is in the eval split when i % EVAL_EVERY == EVAL_EVERY - 1
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py"}
TOKEN_SUFFIXES = {".npy"}
TABLE_SUFFIXES = {".jsonl", ".parquet"}
TOKEN_COLUMNS = ("input_ids", "tokens", "token_ids")
HASH_LIMIT = 64 * 2**20  # corpora up to this many bytes are fingerprinted by content as well
LIST_LIMIT = 1024  # files listed one by one in the fingerprint; above, only their digest (zarr.json stays small)
BUILTIN_SAMPLE = 500  # the builtin fingerprint hashes every 500th document (each is generated alone)


@dataclass(frozen=True)
class CorpusOptions:
    """What decides the token stream; stored in the provenance so a resume can check it."""

    corpus: str
    split: str = "all"
    seq_len: int = 128
    skip_tokens: int = 0
    prepend_bos: bool = False
    text_column: str = "text"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Document = str | np.ndarray  # text, or token ids already


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def resolve_files(corpus: str) -> list[Path]:
    """The files (or HF dataset directories) a corpus spec names, in a stable order."""
    path = Path(corpus).expanduser()
    if _is_hf_dataset_dir(path):
        return [path]
    if path.is_dir():
        found = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix in TEXT_SUFFIXES | TOKEN_SUFFIXES | TABLE_SUFFIXES
        ]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in sorted(glob.glob(corpus, recursive=True)) if Path(p).is_file()]
    if not found:
        raise UsageError(
            f"corpus {corpus!r} matches no readable file: give 'builtin', a text file, a directory, "
            "a glob, a .jsonl/.parquet file, a .npy token array or a saved HF dataset directory"
        )
    return found


def fingerprint_files(corpus: str) -> list[Path]:
    """The files a corpus's stream is read from; a saved HF dataset directory counts file by file
    (without the `cache-*` files `datasets` may add beside its data)."""
    files: list[Path] = []
    for path in resolve_files(corpus):
        if _is_hf_dataset_dir(path):
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith("cache-")]
        else:
            files.append(path)
    return files


def _builtin_fingerprint() -> dict[str, Any]:
    from actstore.grammar import N_DOCUMENTS, builtin_document

    sample = "\x00".join(builtin_document(i)[0] for i in range(0, N_DOCUMENTS, BUILTIN_SAMPLE))
    return {
        "kind": "builtin",
        "n_documents": N_DOCUMENTS,
        "sample": f"every {BUILTIN_SAMPLE}th document",
        "sha256": hashlib.sha256(sample.encode("utf-8")).hexdigest(),
    }


def _file_entries(files: list[Path], hash_content: bool) -> list[dict[str, Any]]:
    entries = []
    for path in files:
        stat = path.stat()
        entry: dict[str, Any] = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if hash_content:
            entry["sha256"] = digest(path)
        entries.append(entry)
    return entries


def _digest(entries: list[dict[str, Any]]) -> str:
    """One hash of the listing: path, size and content (or mtime when the content was not hashed)."""
    lines = (f"{e['path']}\x00{e['size']}\x00{e.get('sha256', e['mtime_ns'])}" for e in entries)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def corpus_fingerprint(corpus: str) -> dict[str, Any]:
    """What the corpus is now, to be recorded in a store and compared on resume (`corpus_change`)."""
    if corpus == "builtin":
        return _builtin_fingerprint()
    files = fingerprint_files(corpus)
    total = sum(p.stat().st_size for p in files)
    entries = _file_entries(files, hash_content=total <= HASH_LIMIT)
    fp: dict[str, Any] = {
        "kind": "files",
        "n_files": len(entries),
        "bytes": total,
        "content_hashed": total <= HASH_LIMIT,
        "digest": _digest(entries),
    }
    if len(entries) <= LIST_LIMIT:
        fp["files"] = entries
    return fp


def corpus_change(recorded: dict[str, Any], corpus: str) -> str | None:
    """How the corpus differs from the `recorded` fingerprint (the first file that does), or None.

    Where the content was hashed, it decides: a file whose mtime alone changed still matches.
    """
    if recorded.get("kind") == "builtin" or corpus == "builtin":
        if corpus == "builtin" and recorded == _builtin_fingerprint():
            return None
        return "the builtin corpus generates other documents than it did (another actstore version's grammar)"
    try:
        files = fingerprint_files(corpus)
    except UsageError:
        files = []
    listed = recorded.get("files")
    if listed is None:  # only the digest was kept: compare counts and sizes first, hash only if they agree
        total = sum(p.stat().st_size for p in files)
        if (len(files), total) != (recorded["n_files"], recorded["bytes"]):
            return f"it had {recorded['n_files']} files of {recorded['bytes']} bytes, now {len(files)} of {total}"
        if _digest(_file_entries(files, bool(recorded["content_hashed"]))) != recorded["digest"]:
            what = "contents" if recorded["content_hashed"] else "mtimes"
            return f"the {what} of some of its {len(files)} files changed"
        return None
    now = {str(p): p for p in files}
    for entry in listed:
        path = now.pop(entry["path"], None)
        if path is None:
            return f"{entry['path']} was removed"
        stat = path.stat()
        if stat.st_size != entry["size"]:
            return f"{entry['path']} changed size ({entry['size']} → {stat.st_size} bytes)"
        if "sha256" in entry:
            if digest(path) != entry["sha256"]:
                return f"{entry['path']} changed content (its sha256 differs)"
        elif stat.st_mtime_ns != entry["mtime_ns"]:
            return f"{entry['path']} was modified (its mtime changed; the corpus is too large to compare by content)"
    if now:
        return f"{next(iter(now))} was added"
    return None


def _table_documents(path: Path, text_column: str) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{n} is not valid JSON ({exc.msg}); fix or remove that line") from None
                if not isinstance(row, dict) or text_column not in row:
                    fields = sorted(row) if isinstance(row, dict) else []
                    raise UsageError(
                        f"{path}:{n} has no {text_column!r} field; pass --text-column with one of {fields}"
                    )
                yield _text(row[text_column], f"{path}:{n}")
        return
    import polars as pl

    columns = pl.read_parquet_schema(path)
    if text_column in columns:
        for i, text in enumerate(pl.read_parquet(path, columns=[text_column])[text_column].to_list()):
            yield _text(text, f"{path} row {i}")
        return
    for name in TOKEN_COLUMNS:
        if name in columns:
            for ids in pl.read_parquet(path, columns=[name])[name].to_list():
                yield np.asarray(ids, dtype=np.int64)
            return
    raise UsageError(
        f"{path} has neither a {text_column!r} text column nor a token column "
        f"({', '.join(TOKEN_COLUMNS)}); pass --text-column with one of {list(columns)}"
    )


def _hf_dataset_documents(path: Path, text_column: str) -> Iterator[Document]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if text_column in ds.column_names:
        for row in ds.select_columns([text_column]).iter(batch_size=1024):
            yield from row[text_column]
        return
    for name in TOKEN_COLUMNS:
        if name in ds.column_names:
            for row in ds.select_columns([name]).iter(batch_size=1024):
                yield from (np.asarray(ids, dtype=np.int64) for ids in row[name])
            return
    raise UsageError(
        f"HF dataset {path} has no {text_column!r} column; pass --text-column with one of {ds.column_names}"
    )


def iter_documents(corpus: str, text_column: str = "text") -> Iterator[Document]:
    """Every document of a corpus spec, in order."""
    if corpus == "builtin":
        from actstore.grammar import builtin_documents

        yield from builtin_documents()
        return
    for path in resolve_files(corpus):
        if _is_hf_dataset_dir(path):
            yield from _hf_dataset_documents(path, text_column)
        elif path.suffix in TABLE_SUFFIXES:
            yield from _table_documents(path, text_column)
        elif path.suffix in TOKEN_SUFFIXES:
            arr = np.load(path, mmap_mode="r")
            if not np.issubdtype(arr.dtype, np.integer):
                raise UsageError(f"{path} holds {arr.dtype} values, not token ids; save integer token arrays")
            if arr.ndim == 1:
                yield np.asarray(arr, dtype=np.int64)
            else:  # one document per row
                for row in arr.reshape(-1, arr.shape[-1]):
                    yield np.asarray(row, dtype=np.int64)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(
            f"{where}: the text is {type(value).__name__}, not a string; clean the corpus or pick another --text-column"
        )
    return value


def _select_split(docs: Iterable[Document], split: str) -> Iterator[Document]:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    for i, doc in enumerate(docs):
        in_eval = i % EVAL_EVERY == EVAL_EVERY - 1
        if split == "all" or (split == "eval") == in_eval:
            yield doc


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """True for the tiny model's tokenizer, whose ids are the UTF-8 bytes themselves."""
    return len(tokenizer) == 257 and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 256


def _tokenized(docs: Iterable[Document], tokenizer: Any, eot_id: int) -> Iterator[np.ndarray]:
    """Token ids per document; text documents get the end-of-text separator appended."""
    byte_level = is_byte_tokenizer(tokenizer)
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        clean = [t.encode("utf-8", errors="replace").decode("utf-8") for t in batch]  # lone surrogates
        ids = tokenizer(clean, add_special_tokens=False)["input_ids"]
        for one in ids:
            yield np.append(np.asarray(one, dtype=np.int64), eot_id)
        batch.clear()

    for doc in docs:
        if isinstance(doc, np.ndarray):
            yield from flush() if batch else ()
            yield doc
        elif byte_level:
            # Same ids as the tokenizer gives (tested), without the per-document Python overhead.
            yield np.append(
                np.frombuffer(doc.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64), eot_id
            )
        else:
            batch.append(doc)
            if len(batch) >= 256:
                yield from flush()
    if batch:
        yield from flush()


def token_sequences(
    opts: CorpusOptions, tokenizer: Any, start_seq: int = 0, batch_seqs: int = 64
) -> Iterator[np.ndarray]:
    """Packed (n, seq_len) int32 sequences from sequence `start_seq` on, `batch_seqs` at a time."""
    eot_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if eot_id is None:
        raise UsageError("the model's tokenizer has no end-of-text token to separate documents")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eot_id
    body = opts.seq_len - 1 if opts.prepend_bos else opts.seq_len
    if body < 1:
        raise UsageError(f"--seq-len {opts.seq_len} is too short; use at least 2")
    to_skip = opts.skip_tokens + start_seq * body
    pending: list[np.ndarray] = []
    n_pending = 0
    docs = _select_split(iter_documents(opts.corpus, opts.text_column), opts.split)
    for ids in _tokenized(docs, tokenizer, eot_id):
        if to_skip:
            drop = min(to_skip, len(ids))
            ids, to_skip = ids[drop:], to_skip - drop
            if not len(ids):
                continue
        pending.append(ids)
        n_pending += len(ids)
        while n_pending >= body * batch_seqs:
            flat = np.concatenate(pending)
            take = body * batch_seqs
            yield _shape(flat[:take], body, bos_id, opts.prepend_bos)
            pending, n_pending = [flat[take:]], len(flat) - take
    if n_pending >= body:
        flat = np.concatenate(pending)
        n = len(flat) // body
        yield _shape(flat[: n * body], body, bos_id, opts.prepend_bos)


def _shape(flat: np.ndarray, body: int, bos_id: int, prepend_bos: bool) -> np.ndarray:
    seqs = flat.reshape(-1, body)
    if prepend_bos:
        seqs = np.concatenate([np.full((len(seqs), 1), bos_id, dtype=seqs.dtype), seqs], axis=1)
    return seqs.astype(np.int32)
