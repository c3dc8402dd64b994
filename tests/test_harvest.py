"""Harvest into Zarr: layout, fidelity to the model, resume after SIGKILL, refusal, damage, codecs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore import store as st
from actstore.corpus import CorpusOptions, token_sequences
from actstore.errors import StoreError, UsageError
from actstore.info import format_info, store_info
from actstore.model import load_model
from actstore.steps.harvest import HarvestOptions, harvest

from .conftest import HOOKS


def test_plain_zarr_finds_tokens_and_activations_where_the_design_says(small_store):
    g = zarr.open_group(small_store, mode="r")  # no actstore reader involved
    assert g["tokens"].shape == (24, 64) and g["tokens"].dtype == np.int32
    for hook in HOOKS:
        acts = g[f"acts/{hook}"]
        assert acts.shape == (24, 64, 128) and acts.dtype == np.float16
        assert acts.metadata.dimension_names == ("seq", "pos", "d")
        assert acts.chunks[1:] == (64, 128)  # chunks hold whole sequences
        values = acts[:].astype(np.float32)
        assert np.isfinite(values).all() and np.abs(values).sum() > 0
    assert g.attrs["commit"]["n_seq"] == 24
    assert g.attrs["model"]["name"] == "tiny" and g.attrs["corpus"]["split"] == "train"
    assert "crc32c" in [c.to_dict()["name"] for c in g["tokens"].metadata.codecs]


def test_stored_tokens_and_activations_are_what_the_model_computes(small_store):
    g = st.open_store(small_store)
    model = load_model("tiny")
    expected_tokens = next(
        token_sequences(CorpusOptions(corpus="builtin", split="train", seq_len=64), model.tokenizer, batch_seqs=24)
    )
    assert np.array_equal(st.read_tokens(g), expected_tokens)
    # A full forward pass (no early stop) through a plain run_with_cache gives the same activations.
    _, cache = model.bridge.run_with_cache(torch.from_numpy(expected_tokens[:4].astype(np.int64)))
    for hook in HOOKS:
        want = cache[hook].float().numpy().astype(np.float16).astype(np.float32)
        got = st.read_acts(g, hook, slice(0, 4))
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_other_settings_are_refused_unless_overwrite(small_store, tmp_path):
    out = str(tmp_path / "s.zarr")
    harvest(out, HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=8))
    before = (Path(out) / "zarr.json").read_bytes()
    with pytest.raises(StoreError, match="other settings .*seq_len.*--overwrite"):
        harvest(out, HarvestOptions(hooks=HOOKS[:1], seq_len=64, tokens=8 * 64, batch_size=8))
    assert (Path(out) / "zarr.json").read_bytes() == before
    harvest(out, HarvestOptions(hooks=HOOKS[:1], seq_len=64, tokens=8 * 64, batch_size=8), overwrite=True)
    assert st.open_store(out)["tokens"].shape == (8, 64)


def test_rerunning_a_complete_harvest_changes_nothing(tmp_path):
    out = str(tmp_path / "s.zarr")
    opts = HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=8)
    harvest(out, opts)
    snapshot = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    harvest(out, opts)
    assert {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()} == snapshot


def test_a_damaged_chunk_is_an_error_on_read(tmp_path):
    out = str(tmp_path / "s.zarr")
    harvest(out, HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=16 * 32, batch_size=8))
    chunk = sorted(p for p in (Path(out) / "acts" / HOOKS[0]).rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    g = st.open_store(out)
    with pytest.raises(StoreError, match="damaged chunk"):
        st.read_acts(g, HOOKS[0])
    st.read_acts(g, HOOKS[0], slice(8, 16))  # the undamaged chunk still reads


def test_lossy_codec_error_is_measured_at_write_and_matches_the_stored_values(tmp_path):
    lossless, lossy = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    common = dict(hooks=HOOKS[:1], seq_len=32, tokens=16 * 32, batch_size=8)
    harvest(lossless, HarvestOptions(**common))
    harvest(lossy, HarvestOptions(codec="bitround-4", **common))
    x = st.read_acts(st.open_store(lossless), HOOKS[0])
    y = st.read_acts(st.open_store(lossy), HOOKS[0])
    assert not np.array_equal(x, y)
    err = np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1)
    rms = np.sqrt(((y - x) ** 2).sum() / (x**2).sum())
    recorded = store_info(lossy)["lossy_error"][HOOKS[0]]
    assert recorded["max_rel"] == pytest.approx(err.max(), rel=1e-4)
    assert recorded["rms_rel"] == pytest.approx(rms, rel=1e-4)
    assert 0 < recorded["rms_rel"] < 2**-4  # 4 mantissa bits kept: error below one part in 16
    assert "lossy error" in format_info(store_info(lossy))
    sizes = {p: st.bytes_on_disk(Path(p) / "acts") for p in (lossless, lossy)}
    assert sizes[lossy] < 0.8 * sizes[lossless]


def test_bfloat16_and_float32_stores_read_back_as_float32(tmp_path):
    common = dict(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=8)
    ref = str(tmp_path / "f32.zarr")
    harvest(ref, HarvestOptions(dtype="float32", **common))
    x = st.read_acts(st.open_store(ref), HOOKS[0])
    bf = str(tmp_path / "bf16.zarr")
    harvest(bf, HarvestOptions(dtype="bfloat16", **common))
    raw = zarr.open_group(bf, mode="r")[f"acts/{HOOKS[0]}"]
    assert raw.dtype == np.uint16 and raw.attrs["actstore_dtype"] == "bfloat16"
    y = st.read_acts(st.open_store(bf), HOOKS[0])
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(y, want)


def test_sharded_store_reads_like_an_unsharded_one(tmp_path, small_store):
    out = str(tmp_path / "sharded.zarr")
    harvest(out, HarvestOptions(hooks=HOOKS, seq_len=64, tokens=24 * 64, batch_size=8, split="train", shard_seqs=16))
    a, b = st.open_store(out), st.open_store(small_store)
    assert a["tokens"].shards == (16, 64)
    assert np.array_equal(st.read_acts(a, HOOKS[1]), st.read_acts(b, HOOKS[1]))


def test_info_reports_sizes_ratio_and_provenance(small_store):
    info = store_info(small_store)
    acts = info["arrays"][f"acts/{HOOKS[0]}"]
    assert acts["bytes_on_disk"] > 0 and acts["compression_ratio"] > 1.0
    assert info["complete"] and info["committed_sequences"] == 24
    text = format_info(info)
    for needle in ("tokens", HOOKS[0], "lz4", "crc32c", "tiny", "24 / 24"):
        assert needle in text


def test_a_corpus_shorter_than_asked_gives_a_truncated_store(tmp_path):
    (tmp_path / "c.txt").write_text("a short corpus. " * 20)  # 320 bytes + EOT
    out = str(tmp_path / "s.zarr")
    harvest(
        out, HarvestOptions(corpus=str(tmp_path / "c.txt"), hooks=HOOKS[:1], seq_len=32, tokens=100 * 32, batch_size=4)
    )
    g = st.open_store(out)
    assert g["tokens"].shape == (10, 32) and st.committed(g) == 10 and g.attrs["truncated"]
    assert os.path.exists(out)


def test_activations_float16_cannot_hold_are_a_one_line_error_and_the_store_resumes(tmp_path, monkeypatch):
    import torch

    from actstore.errors import StoreError
    from actstore.steps import harvest as hv

    big = torch.full((2, 3, 4), 1e5)
    with pytest.raises(StoreError, match=r"reach 1e\+05 .*beyond what float16 holds.*--dtype bfloat16"):
        hv._stored_finite("blocks.0.hook_resid_post", big, "float16", 0)
    assert np.isfinite(hv._stored_finite("h", big, "float32", 0)).all()
    assert hv._stored_finite("h", big, "bfloat16", 0).dtype == np.uint16  # bfloat16 holds 1e5
    with pytest.raises(StoreError, match="produced NaN or inf"):
        hv._stored_finite("h", torch.full((1, 2, 2), float("nan")), "float32", 0)

    real = hv.capture
    calls = {"n": 0}

    def blows_up_on_the_second_batch(model, tokens, hooks):
        calls["n"] += 1
        acts = real(model, tokens, hooks)
        return {h: a * (1e6 if calls["n"] == 2 else 1) for h, a in acts.items()}

    out = str(tmp_path / "s.zarr")
    opts = HarvestOptions(hooks=("blocks.1.hook_resid_post",), seq_len=32, tokens=16 * 32, batch_size=4, chunk_seqs=4)
    monkeypatch.setattr(hv, "capture", blows_up_on_the_second_batch)
    with pytest.raises(StoreError, match="beyond what float16 holds"):
        harvest(out, opts)
    monkeypatch.setattr(hv, "capture", real)
    harvest(out, opts)  # the same command resumes after the committed batch
    g = zarr.open_group(out, mode="r")
    assert g.attrs["commit"]["n_seq"] == 16 and np.isfinite(g["acts/blocks.1.hook_resid_post"][:]).all()


def _corpus_dir(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the first file of the corpus. " * 14)
    (corpus / "b.txt").write_text("and here is the second file! " * 14)
    return corpus


def _uncommit(out: str, n_seq: int = 4) -> None:
    """Set the commit record and the chunks' done flags back, as a harvest killed after its first batch leaves them."""
    group = zarr.open_group(out, mode="r+")
    st.commit(group, n_seq)
    flags = group[st.COMMITS]
    flags[n_seq // st.chunk_seqs(group) :] = np.zeros(flags.shape[0] - n_seq // st.chunk_seqs(group), dtype=np.uint8)


def _same_bytes(a: str, b: str) -> bool:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    arrays = ["tokens", *(f"acts/{h}" for h in st.hooks_of(ga))]
    return st.hooks_of(ga) == st.hooks_of(gb) and all(
        ga[n].shape == gb[n].shape and ga[n][:].tobytes() == gb[n][:].tobytes() for n in arrays
    )


def test_the_store_records_a_corpus_fingerprint_that_a_touched_file_still_matches(tmp_path):
    corpus = _corpus_dir(tmp_path)
    opts = HarvestOptions(corpus=str(corpus), hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=4)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    harvest(ref, opts)
    harvest(out, opts)
    fp = zarr.open_group(out, mode="r").attrs["corpus"]["fingerprint"]
    assert fp["kind"] == "files" and fp["content_hashed"] and fp["n_files"] == 2
    assert [(Path(f["path"]).name, f["size"]) for f in fp["files"]] == [("a.txt", 420), ("b.txt", 406)]
    assert all(len(f["sha256"]) == 64 and f["mtime_ns"] > 0 for f in fp["files"])
    assert "fingerprint  2 files" in format_info(store_info(out))

    _uncommit(out)
    later = time.time() + 100
    os.utime(corpus / "a.txt", (later, later))  # `touch`: same bytes, new mtime
    harvest(out, opts)  # the content decides: resumed
    assert st.committed(st.open_store(out)) == 8 and _same_bytes(out, ref)


@pytest.mark.parametrize(
    "change, says",
    [
        (
            lambda c: (c / "b.txt").write_text((c / "b.txt").read_text().replace("second", "SECOND")),
            "b.txt changed content",
        ),
        (lambda c: (c / "b.txt").write_text("short"), r"b.txt changed size \(406 → 5 bytes\)"),
        (lambda c: (c / "b.txt").unlink(), "b.txt was removed"),
        (lambda c: (c / "0.txt").write_text("new"), "0.txt was added"),
    ],
    ids=["content", "size", "removed", "added"],
)
def test_resuming_over_a_changed_corpus_is_refused_in_one_line_unless_overwrite(tmp_path, change, says):
    corpus = _corpus_dir(tmp_path)
    opts = HarvestOptions(corpus=str(corpus), hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=4)
    out = str(tmp_path / "s.zarr")
    harvest(out, opts)
    _uncommit(out)
    change(corpus)
    before = (Path(out) / "zarr.json").read_bytes()
    with pytest.raises(
        StoreError, match=f"{out} cannot resume: its corpus changed .*{says}.*; restore the corpus, or use --overwrite"
    ) as err:
        harvest(out, opts)
    assert "\n" not in str(err.value) and (Path(out) / "zarr.json").read_bytes() == before
    if says.startswith("b.txt changed size"):
        return  # the corpus is now too short for 8 sequences; the others check --overwrite
    harvest(out, opts, overwrite=True)  # harvests afresh from the corpus as it is now
    fresh = str(tmp_path / "fresh.zarr")
    harvest(fresh, opts)
    assert _same_bytes(out, fresh) and st.committed(st.open_store(out)) == 8
    assert not Path(out + ".partial").exists()
    assert zarr.open_group(out).attrs["corpus"] == zarr.open_group(fresh).attrs["corpus"]


def test_a_store_without_a_fingerprint_still_resumes_with_a_warning(tmp_path, capsys):
    corpus = _corpus_dir(tmp_path)
    opts = HarvestOptions(corpus=str(corpus), hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=4)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    harvest(ref, opts)
    harvest(out, opts)
    g = zarr.open_group(out, mode="r+")
    g.attrs["corpus"] = {k: v for k, v in g.attrs["corpus"].items() if k != "fingerprint"}  # an older version's store
    _uncommit(out)
    capsys.readouterr()
    harvest(out, opts)
    assert "records no corpus fingerprint" in capsys.readouterr().err
    assert st.committed(st.open_store(out)) == 8 and _same_bytes(out, ref)


def test_rerunning_a_complete_store_needs_neither_the_corpus_nor_the_model(tmp_path, monkeypatch):
    from actstore.steps import harvest as hv

    corpus = _corpus_dir(tmp_path)
    opts = HarvestOptions(corpus=str(corpus), hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=4)
    out = str(tmp_path / "s.zarr")
    harvest(out, opts)
    (corpus / "a.txt").unlink()
    monkeypatch.setattr(hv, "load_model", lambda *a: pytest.fail("a complete store must not load the model"))
    harvest(out, opts)


class _Killed(BaseException):
    """Stands in for SIGKILL at a chosen point of the truncation."""


def _truncation_opts(tmp_path: Path) -> HarvestOptions:
    (tmp_path / "c.txt").write_text("a short corpus. " * 20)  # 321 tokens: 10 sequences of 32, not 100
    return HarvestOptions(corpus=str(tmp_path / "c.txt"), hooks=HOOKS, seq_len=32, tokens=100 * 32, batch_size=4)


def _lengths(out: str) -> set[int]:
    g = zarr.open_group(out, mode="r")
    return {g["tokens"].shape[0], *(g[f"acts/{h}"].shape[0] for h in HOOKS)}


@pytest.mark.parametrize("kill_at", [0, 1, 2, 3])
def test_a_kill_during_truncation_is_finished_by_the_next_harvest_bit_identical(tmp_path, monkeypatch, kill_at):
    """kill_at 0: before the intent record is written; k ≥ 1: at the k-th of the three resizes."""
    opts = _truncation_opts(tmp_path)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    harvest(ref, opts)
    assert _lengths(ref) == {10}

    calls = {"n": 0}
    real_resize, real_truncate = zarr.Array.resize, st.truncate

    def resize(self, shape, *a, **kw):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise _Killed
        return real_resize(self, shape, *a, **kw)

    def truncate(group, n_seq):
        if kill_at == 0:
            raise _Killed
        real_truncate(group, n_seq)

    monkeypatch.setattr(zarr.Array, "resize", resize)
    monkeypatch.setattr(st, "truncate", truncate)
    with pytest.raises(_Killed):
        harvest(out, opts)
    monkeypatch.undo()
    attrs = zarr.open_group(out, mode="r").attrs
    if kill_at == 2:  # what the old code left for good: tokens cut, acts not
        assert _lengths(out) == {10, 100} and attrs["truncating_to"] == 10
    if kill_at == 0:
        assert "truncating_to" not in attrs and _lengths(out) == {100}

    harvest(out, opts)  # the same command finishes the store
    g = zarr.open_group(out, mode="r")
    assert _lengths(out) == {10} and "truncating_to" not in g.attrs
    assert g.attrs["n_seq"] == 10 and g.attrs["truncated"] and st.committed(g) == 10
    assert _same_bytes(out, ref)


def test_a_reader_finishes_a_truncation_a_killed_harvest_left(tmp_path, monkeypatch):
    opts = _truncation_opts(tmp_path)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    harvest(ref, opts)
    real_resize, calls = zarr.Array.resize, {"n": 0}

    def resize(self, shape, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Killed
        return real_resize(self, shape, *a, **kw)

    monkeypatch.setattr(zarr.Array, "resize", resize)
    with pytest.raises(_Killed):
        harvest(out, opts)
    monkeypatch.undo()
    assert _lengths(out) == {10, 100}
    g = st.open_store(out)  # a reader (info, train, eval) never sees the arrays of different lengths
    assert {g["tokens"].shape[0], *(g["acts"][h].shape[0] for h in HOOKS)} == {10}
    assert "truncating_to" not in g.attrs and g.attrs["truncated"] and store_info(out)["complete"]
    assert _same_bytes(out, ref)


def test_a_resumed_harvest_removes_the_chunk_files_a_killed_writer_left(small_store, tmp_path):
    """zarr writes a chunk to <key>.<uuid>.partial and renames it; a kill between leaves the temporary
    file, which readers ignore but which would make a resumed store differ from an uninterrupted one."""
    import shutil

    out = tmp_path / "s.zarr"
    shutil.copytree(small_store, out)
    chunk = next(p for p in (out / "acts" / HOOKS[0]).rglob("*") if p.is_file() and p.name[0].isdigit())
    left = chunk.with_name(chunk.name + ".0123456789abcdef0123456789abcdef.partial")
    left.write_bytes(b"half a chunk")
    unrelated = out / "notes.partial"  # not zarr's naming: not ours to remove
    unrelated.write_text("mine")
    harvest(str(out), HarvestOptions(hooks=HOOKS, seq_len=64, tokens=24 * 64, batch_size=8, split="train"))
    assert not left.exists() and unrelated.exists()


def test_a_harvest_killed_while_writing_the_stores_first_metadata_starts_afresh(tmp_path):
    """Killed inside zarr's first write of `zarr.json`, a harvest leaves only `zarr.<uuid>.partial`: no store,
    so the re-run creates one (and the leftover goes); a directory holding anything else is still refused."""
    out = tmp_path / "s.zarr"
    out.mkdir()
    left = out / "zarr.0123456789abcdef0123456789abcdef.partial"
    left.write_bytes(b'{"zarr_for')
    opts = HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=8)
    harvest(str(out), opts)
    assert store_info(str(out))["complete"] and not left.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b"")
    (other / "mine.txt").write_text("not a store")
    with pytest.raises(UsageError, match="not an actstore store; choose an empty or new path"):
        harvest(str(other), opts)
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt", "zarr.0123456789abcdef0123456789abcdef.partial"]


@pytest.mark.parametrize("gone", ["commits", f"acts/{HOOKS[1]}"])
def test_a_harvest_killed_while_creating_the_arrays_starts_afresh(tmp_path, gone):
    """The arrays are created one by one after the group: a kill between leaves some missing and nothing
    written, and the re-run gives the store an uninterrupted harvest gives."""
    import shutil

    opts = HarvestOptions(hooks=HOOKS, seq_len=32, tokens=8 * 32, batch_size=8)
    ref, out = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    harvest(str(ref), opts)
    harvest(str(out), opts)
    g = zarr.open_group(out, mode="r+")
    g.attrs["commit"] = {"n_seq": 0, "updated": st.now()}
    g[st.COMMITS][:] = 0
    shutil.rmtree(out / gone)
    harvest(str(out), opts)
    for hook in HOOKS:
        assert np.array_equal(st.read_acts(st.open_store(str(out)), hook), st.read_acts(st.open_store(str(ref)), hook))
    assert store_info(str(out))["complete"]


def test_the_store_records_the_device_and_the_versions_that_computed_it(tmp_path):
    out = str(tmp_path / "s.zarr")
    harvest(out, HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=4))
    attrs = zarr.open_group(out, mode="r").attrs
    runtime = attrs["model"]["runtime"]
    assert runtime["torch"] == torch.__version__ and runtime["cuda"] == torch.version.cuda
    assert runtime["device_name"]  # the CPU's (platform) name here; torch.cuda.get_device_name on a GPU
    assert "runtime" not in attrs["settings"] and attrs["settings"]["device"] == "cpu"  # settings stay comparable


def test_a_resume_under_another_torch_warns_in_one_line_and_ends_bit_identical(tmp_path, capsys):
    opts = HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=4)
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    harvest(ref, opts)
    harvest(out, opts)
    g = zarr.open_group(out, mode="r+")
    model = dict(g.attrs["model"])
    g.attrs["model"] = {**model, "runtime": {**model["runtime"], "torch": "1.0.0-older"}}  # started by another torch
    _uncommit(out)
    capsys.readouterr()
    harvest(out, opts)
    err = [line for line in capsys.readouterr().err.splitlines() if "another runtime" in line]
    assert len(err) == 1 and f"torch 1.0.0-older → {torch.__version__}" in err[0]
    assert "same hardware and versions" in err[0] and "CUDA" not in err[0] and "device" not in err[0].split("(")[1]
    assert st.committed(st.open_store(out)) == 8 and _same_bytes(out, ref)
    g.attrs["model"] = model  # the runtime that started it is this one: a resume says nothing
    _uncommit(out)
    harvest(out, opts)
    assert "another runtime" not in capsys.readouterr().err
