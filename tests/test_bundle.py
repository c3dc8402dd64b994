"""Bundles: what goes in, what bare DuckDB reads back, and what `verify` catches (directory, .tar and .zip)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr
from click.testing import CliRunner

import actstore
from actstore import run as rundir
from actstore.cli.bundle import bundle as bundle_cli
from actstore.errors import StoreError, UsageError
from actstore.steps import bundle
from actstore.tables import SCHEMA_VERSION, TABLES

SAE_IDS = ("blocks.1.hook_resid_post__k4_x2_s0", "blocks.3.hook_resid_post__k8_x2_s0")
N_SEQ, SEQ_LEN, D = 3, 4, 2
KINDS = ("", ".tar", ".zip")  # a directory bundle, then the two archives
TOKENS_PART = f"records/tokens/sae_id={SAE_IDS[0]}/part-0.parquet"
LAYERS_PART = "records/layers/store_key=somekey/part-0.parquet"
FLOATS = [c.name for c in TABLES["tokens"].columns if c.type == "FLOAT"]  # the rest of a tokens row: 1.0


def _hook(sae_id: str) -> str:
    return sae_id.split("__")[0]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Two evaluated SAEs: records of four tables (one keyed by store), an eval store with recon, fake weights,
    and the leftovers of a killed eval and a killed training."""
    store = tmp_path / "eval.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    group.attrs.update(
        {"model": {"name": "tiny"}, "corpus": {"corpus": "builtin", "split": "eval"}, "seq_len": SEQ_LEN}
    )
    group.create_array("tokens", shape=(N_SEQ, SEQ_LEN), dtype="int32")[:] = np.arange(N_SEQ * SEQ_LEN).reshape(
        N_SEQ, -1
    )
    run = tmp_path / "run"
    seq, pos = np.repeat(np.arange(N_SEQ), SEQ_LEN), np.tile(np.arange(SEQ_LEN), N_SEQ)
    for i, sae_id in enumerate(SAE_IDS):
        recon = group.create_array(f"recon/{sae_id}/{_hook(sae_id)}", shape=(N_SEQ, SEQ_LEN, D), dtype="float16")
        recon[:] = np.full((N_SEQ, SEQ_LEN, D), i + 0.5)
        tokens = pl.DataFrame(
            {"seq": seq, "pos": pos, "token": seq * SEQ_LEN + pos, "sse": [0.5] * len(seq), "sst": [2.0] * len(seq)}
        ).with_columns(ce_orig=pl.lit(3.0), ce_patched=pl.lit(3.0 + i), store=pl.lit(str(store)))
        tokens = tokens.with_columns(pl.lit(1.0).alias(c) for c in FLOATS if c not in tokens.columns)
        saes = pl.DataFrame({"model": ["tiny"], "hook": [_hook(sae_id)], "k": [4 * (i + 1)], "d_sae": [4]})
        evals = pl.DataFrame({"store": [str(store)], "n_seq": [N_SEQ]})
        rundir.write_tables(run, sae_id, {"saes": saes, "tokens": tokens, "evals": evals})
        (run / "saes" / sae_id).mkdir(parents=True)
        (run / "saes" / sae_id / "cfg.json").write_text(json.dumps({"k": 4 * (i + 1), "hook_name": _hook(sae_id)}))
        (run / "saes" / sae_id / "sae_weights.safetensors").write_bytes(bytes([i]) * 64)
    rundir.write_tables(
        run, "somekey", {"layers": pl.DataFrame({"hook": [_hook(SAE_IDS[0])], "layer": [1], "pr": [3.5]})}
    )
    for leftover in ("sae_id=killed.partial", "sae_id=replaced.old"):  # a killed eval's leftovers
        (run / "records" / "tokens" / leftover).mkdir()
        (run / "records" / "tokens" / leftover / "part-0.parquet").write_bytes((run / LAYERS_PART).read_bytes())
    (run / "saes" / f"{SAE_IDS[0]}.partial").mkdir()  # a killed training's
    (run / "saes" / f"{SAE_IDS[0]}.partial" / "cfg.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"store": "train.zarr", "model": "tiny"}))
    return run


def _make(run: Path, tmp_path: Path, kind: str = "", **kw) -> Path:
    return bundle.create(str(run), str(tmp_path / f"out{kind}"), **kw)


def _manifest(path: Path) -> dict:
    return json.loads((bundle.open_bundle(str(path)) / "manifest.json").read_text())


def _flip_byte(path: Path, member: str) -> None:
    """Change one byte of `member` where it lies: the file itself, or its stored bytes inside the archive."""
    raw = bytearray(path.read_bytes() if path.is_file() else (path / member).read_bytes())
    if path.is_file():
        content = bundle.open_bundle(str(path)).joinpath(member).read_bytes()
        where = raw.find(content) + len(content) // 2
    else:
        where = len(raw) // 2
    raw[where] ^= 0xFF
    (path if path.is_file() else path / member).write_bytes(raw)


def _rewrite(path: Path, edit) -> None:
    """Apply `edit(directory)` to a bundle; an archive is unpacked, edited and packed again in its own format."""
    if path.is_dir():
        return edit(path)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.unpack_archive(path, root)
        edit(root)
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if path.suffix == ".tar":
            with tarfile.open(path, "w") as tf:
                for name in names:
                    tf.add(root / name, arcname=name)
        else:
            with zipfile.ZipFile(path, "w") as zf:
                for name in names:
                    zf.write(root / name, arcname=name)


def _bare_python(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter in the bundle directory `cwd`, as a collaborator without actstore would."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_bundle's extraction cache goes under this test's tmp_path, not the machine's /tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_bundle_verifies_clean(run, tmp_path, kind):
    out = _make(run, tmp_path, kind)
    assert out.is_dir() == (kind == "")
    assert bundle.verify(str(out)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval.zarr", "run", "tmp", out.name])


def test_bundle_copies_every_record_file_at_its_path_and_skips_staging_leftovers(run, tmp_path):
    out = _make(run, tmp_path)
    wanted = {p.relative_to(run).as_posix() for t in TABLES for p in rundir.part_files(run, t)}
    got = {p.relative_to(out).as_posix() for p in (out / "records").rglob("*.parquet")}
    assert got == wanted and len(got) == 3 * len(SAE_IDS) + 1
    assert LAYERS_PART in got and not any("killed" in name or "replaced" in name for name in got)
    assert (out / TOKENS_PART).read_bytes() == (run / TOKENS_PART).read_bytes()


def test_manifest_lists_every_file_with_sha_and_size_and_the_provenance(run, tmp_path):
    out = _make(run, tmp_path)
    manifest = _manifest(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and "README.md" in on_disk
    assert manifest["files"][TOKENS_PART]["size"] == (out / TOKENS_PART).stat().st_size
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert {"views.sql", "sql/_macros.sql", "sql/summary.sql"} <= set(manifest["files"])
    provenance = manifest["provenance"]
    assert provenance["run"] == {"store": "train.zarr", "model": "tiny"}
    assert [attrs["corpus"]["split"] for attrs in provenance["stores"].values()] == ["eval"]
    assert sorted(row["sae_id"] for row in provenance["saes"]) == sorted(SAE_IDS)
    assert manifest["tables"]["tokens"] == {"files": 2, "rows": 2 * N_SEQ * SEQ_LEN}


@pytest.mark.parametrize("kind", KINDS)
def test_one_changed_byte_of_a_parquet_file_is_reported(run, tmp_path, kind):
    out = _make(run, tmp_path, kind)
    _flip_byte(out, TOKENS_PART)
    problems = bundle.verify(str(out))
    assert len(problems) == 1 and TOKENS_PART in problems[0]


@pytest.mark.parametrize("kind", KINDS)
def test_missing_and_extra_files_are_reported(run, tmp_path, kind):
    out = _make(run, tmp_path, kind)

    def edit(root: Path) -> None:
        (root / TOKENS_PART).unlink()
        (root / "records" / "tokens" / "notes.txt").write_text("added later")

    _rewrite(out, edit)
    problems = bundle.verify(str(out))
    assert sorted(p.split(":")[0] for p in problems) == ["extra", "missing"]
    assert any(TOKENS_PART in p for p in problems) and any("notes.txt" in p for p in problems)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_or_garbled_manifest_is_reported(run, tmp_path, kind):
    out = _make(run, tmp_path, kind)
    _rewrite(out, lambda root: (root / "manifest.json").unlink())
    assert "no manifest.json" in bundle.verify(str(out))[0]
    _rewrite(out, lambda root: (root / "manifest.json").write_text("{not json"))
    assert "unreadable" in bundle.verify(str(out))[0]


def test_bare_duckdb_reads_the_records_with_their_partitions(run, tmp_path):
    out = _make(run, tmp_path)
    script = (
        "import sys, duckdb\n"
        'rel = duckdb.sql("SELECT count(*), list(DISTINCT sae_id ORDER BY sae_id) '
        "FROM read_parquet('records/tokens/*/*.parquet', hive_partitioning = true)\")\n"
        "print(rel.fetchall()[0]); assert 'actstore' not in sys.modules\n"
    )
    done = _bare_python(script, out)
    assert done.stdout.strip() == str((2 * N_SEQ * SEQ_LEN, list(SAE_IDS)))


def test_readme_describes_the_tables_from_the_schema_and_states_no_formula(run, tmp_path):
    out = _make(run, tmp_path)
    readme = (out / "README.md").read_text()
    for table in ("tokens", "saes", "evals", "layers"):
        assert f"### {table}\n\n{TABLES[table].about[0].upper()}{TABLES[table].about[1:]}" in readme
    for row in (
        "| sse | FLOAT | ‖e‖² |",
        "| sae_id | VARCHAR | partition key",
        "| store_key | VARCHAR |",
        "| pr | DOUBLE |",
    ):
        assert row in readme
    assert "### codes" not in readme and "partitioned by store_key" in readme
    assert "duckdb -init views.sql" in readme and ".read sql/summary.sql" in readme
    assert "docs/METHODS.md" in readme and "`sql/kl_gap.sql`" in readme
    assert "sum(sse)" not in readme and "ce_patched" not in readme.split("## Querying")[1]


def test_readme_plain_query_runs_in_bare_duckdb(run, tmp_path):
    out = _make(run, tmp_path)
    (query,) = re.findall(r"```sql\n(.*?)```", (out / "README.md").read_text(), re.S)
    script = "import duckdb, sys\nprint(duckdb.sql(sys.argv[1]).fetchall())\nassert 'actstore' not in sys.modules\n"
    done = _bare_python(script, out, query)
    assert done.stdout.strip() == str([(sae_id, N_SEQ * SEQ_LEN) for sae_id in SAE_IDS])


def test_bundle_ships_the_sql_library_as_packaged(run, tmp_path):
    out = _make(run, tmp_path)
    shipped = {q.name: q.text for q in actstore.analytics.named_queries().values()}
    assert {p.stem: p.read_text() for p in (out / "sql").glob("*.sql") if p.stem != "_macros"} == shipped
    assert (out / "sql" / "_macros.sql").read_text() == actstore.analytics.macros()
    views = (out / "views.sql").read_text()
    assert str(tmp_path) not in views and "read_parquet('records/tokens/*/*.parquet'" in views
    assert actstore.analytics.macros() in views


def test_views_and_summary_run_in_bare_duckdb_and_match_actstore_query(run, tmp_path):
    out = _make(run, tmp_path, ".tar")
    script = (
        "import json, sys, duckdb\n"
        "con = duckdb.connect()\n"
        "con.execute(open('views.sql').read())\n"
        "con.execute('SET VARIABLE n_boot = 50')\n"
        "rel = con.sql(open('sql/summary.sql').read())\n"
        "rows = [dict(zip(rel.columns, row)) for row in rel.fetchall()]\n"
        "empty = con.sql('SELECT count(*), count(latent) FROM codes').fetchall()[0]\n"
        "print(json.dumps({'summary': {r['sae_id']: [r['r2'], r['ce_rec']] for r in rows}, 'empty': empty}))\n"
        "assert 'actstore' not in sys.modules\n"
    )
    cwd = bundle.open_bundle(str(out))
    done = _bare_python(script, cwd)
    got = json.loads(done.stdout)
    assert got["empty"] == [0, 0]  # a table the bundle lacks is an empty view with its columns
    ours = actstore.query(str(run), "summary", n_boot=50)
    assert sorted(got["summary"]) == sorted(ours["sae_id"]) == sorted(SAE_IDS)
    for sae_id, r2, ce_rec in ours.select("sae_id", "r2", "ce_rec").rows():
        assert got["summary"][sae_id] == pytest.approx([r2, ce_rec])
    assert ours["r2"].to_list() == pytest.approx([0.75, 0.75]) and sorted(ours["ce_rec"]) == pytest.approx([2 / 3, 1])


def test_create_refuses_an_existing_out_and_leaves_it_untouched(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="--overwrite"):
        bundle.create(str(run), str(out))
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    bundle.create(str(run), str(out), overwrite=True)
    assert not (out / "mine.txt").exists() and bundle.verify(str(out)) == []


def test_create_refuses_to_overwrite_the_run_itself(run, tmp_path):
    with pytest.raises(UsageError, match="outside"):
        bundle.create(str(run), str(tmp_path), overwrite=True)
    assert (run / TOKENS_PART).is_file()


def test_run_without_records_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="actstore eval"):
        bundle.create(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_with_saes_includes_the_weights(run, tmp_path, kind):
    plain = bundle.listing(str(_make(run, tmp_path, kind)))
    assert not any(name.startswith("saes/") for name in plain)
    out = bundle.create(str(run), str(tmp_path / f"full{kind}"), with_saes=True)
    weights = f"saes/{SAE_IDS[1]}/sae_weights.safetensors"
    assert weights in _manifest(out)["files"] and f"saes/{SAE_IDS[0]}/cfg.json" in bundle.listing(str(out))
    assert (bundle.open_bundle(str(out)) / weights).read_bytes() == (run / weights).read_bytes()
    assert not any(".partial" in name for name in bundle.listing(str(out)))
    assert bundle.verify(str(out)) == []


def test_with_recon_packs_a_zarr_group_of_tokens_and_reconstructions(run, tmp_path):
    out = _make(run, tmp_path, with_recon=True)
    group = zarr.open_group(str(out / "recon.zarr"), mode="r")
    assert group.attrs["corpus"]["split"] == "eval" and "acts" not in group
    assert np.array_equal(group["tokens"][:], np.arange(N_SEQ * SEQ_LEN).reshape(N_SEQ, -1))
    assert float(group[f"recon/{SAE_IDS[1]}/{_hook(SAE_IDS[1])}"][0, 0, 0]) == 1.5
    assert any(name.startswith("recon.zarr/recon/") for name in _manifest(out)["files"])


def test_failed_create_leaves_nothing_behind(run, tmp_path):
    shutil.rmtree(tmp_path / "eval.zarr")
    with pytest.raises(StoreError, match="not found"):
        _make(run, tmp_path, ".tar", with_recon=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]


def test_open_bundle_extracts_an_archive_once_and_again_when_it_changes(run, tmp_path):
    out = _make(run, tmp_path, ".zip")
    first = bundle.open_bundle(str(out))
    assert (first / TOKENS_PART).is_file() and (first / "manifest.json").is_file()
    inode = (first / TOKENS_PART).stat().st_ino
    assert bundle.open_bundle(str(out)) == first and (first / TOKENS_PART).stat().st_ino == inode  # not again
    bundle.create(str(run), str(out), overwrite=True, with_saes=True)
    second = bundle.open_bundle(str(out))
    assert second != first and (second / "saes").is_dir()
    assert bundle.open_bundle(str(run)) == run


@pytest.mark.parametrize("change", ["added", "flipped", "removed"])
def test_a_cached_extraction_that_changed_is_extracted_afresh(run, tmp_path, change):
    out = _make(run, tmp_path, ".tar")
    cache = bundle.open_bundle(str(out))
    if change == "added":
        (cache / "marker").write_text("not from the archive")
    elif change == "flipped":
        (cache / TOKENS_PART).write_bytes(b"x" + (cache / TOKENS_PART).read_bytes()[1:])
    else:
        (cache / "README.md").unlink()  # a /tmp cleaner took it
    assert bundle.open_bundle(str(out)) == cache
    assert not (cache / "marker").exists() and (cache / TOKENS_PART).read_bytes() == (run / TOKENS_PART).read_bytes()
    assert bundle.verify(str(cache)) == [] and [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_cli_creates_a_bundle_and_verify_says_ok(run, tmp_path):
    out = tmp_path / "out.tar"
    made = CliRunner().invoke(bundle_cli, ["create", str(run), str(out), "--with-saes"])
    assert made.exit_code == 0, made.output
    assert made.stdout.strip() == str(out) and "files" in made.stderr
    checked = CliRunner().invoke(bundle_cli, ["verify", str(out)])
    assert checked.exit_code == 0
    assert checked.stdout.strip() == f"ok: {len(_manifest(out)['files'])} files verified"


def test_cli_verify_names_the_changed_file_and_exits_1(run, tmp_path):
    out = _make(run, tmp_path)
    _flip_byte(out, TOKENS_PART)
    checked = CliRunner().invoke(bundle_cli, ["verify", str(out)])
    assert checked.exit_code == 1 and isinstance(checked.exception, StoreError)
    assert TOKENS_PART in checked.stdout


def test_cli_create_refuses_an_existing_out_without_overwrite(run, tmp_path):
    out = _make(run, tmp_path)
    before = (out / "manifest.json").read_bytes()
    refused = CliRunner().invoke(bundle_cli, ["create", str(run), str(out)])
    assert isinstance(refused.exception, UsageError) and "--overwrite" in str(refused.exception)
    assert (out / "manifest.json").read_bytes() == before


# ---- untrusted bundles: what open_bundle refuses before anything is extracted or queried -----------------


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _cache_entries(tmp_path: Path) -> list[str]:
    """What open_bundle left in its extraction cache (under the test's private temp directory)."""
    return sorted(p.name for root in (tmp_path / "tmp").glob("actstore-bundles*") for p in root.iterdir())


def _assert_refused(exc: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, data


# name -> (what goes into the archive, the member the refusal names, where it would land outside)
EVIL_TAR = {
    "parent": lambda outside: _tar_member("records/../../../../evil", data=b"pwned"),
    "absolute": lambda outside: _tar_member(str(outside), data=b"pwned"),
    "symlink": lambda outside: _tar_member("records/tokens/passwd.parquet", tarfile.SYMTYPE, link="/etc/passwd"),
    "hardlink": lambda outside: _tar_member("records/evil", tarfile.LNKTYPE, link="../../../etc/passwd"),
    "fifo": lambda outside: _tar_member("records/tokens/fifo.parquet", tarfile.FIFOTYPE),
    "device": lambda outside: _tar_member("records/disk", tarfile.BLKTYPE),
    "backslash": lambda outside: _tar_member("..\\..\\evil", data=b"pwned"),
    "drive": lambda outside: _tar_member("C:/evil", data=b"pwned"),
}
REFUSAL = {
    "parent": "'..'",
    "absolute": "absolute",
    "symlink": "symlink (to '/etc/passwd')",
    "hardlink": "hard link",
    "fifo": "fifo",
    "device": "device",
    "backslash": "backslash",
    "drive": "absolute",
}


@pytest.mark.parametrize("case", sorted(EVIL_TAR))
def test_a_tar_with_one_unsafe_member_is_refused_whole(run, tmp_path, case):
    out = _make(run, tmp_path, ".tar")
    outside = tmp_path / "outside" / "evil"
    info, data = EVIL_TAR[case](outside)
    with tarfile.open(out, "a") as tf:
        tf.addfile(info, io.BytesIO(data))
    before = _tree(tmp_path)
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(out))
    _assert_refused(exc, str(out), repr(info.name), REFUSAL[case], "actstore bundle create")
    assert _tree(tmp_path) - before <= {f"tmp/actstore-bundles-{os.getuid()}"} and _cache_entries(tmp_path) == []
    assert not outside.exists() and not (tmp_path / "evil").exists()
    assert bundle.verify(str(out)) == [str(exc.value)]  # verify reports it too, instead of an "ok"


def _zip_member(zf: zipfile.ZipFile, name: str, data: bytes = b"pwned", mode: int | None = None, **kw) -> None:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.create_system, info.external_attr = 3, mode << 16
    zf.writestr(info, data, **kw)


EVIL_ZIP = {
    "parent": (lambda zf, outside: _zip_member(zf, "records/../../../../evil"), "'..'"),
    "absolute": (lambda zf, outside: _zip_member(zf, str(outside)), "absolute"),
    "symlink": (lambda zf, outside: _zip_member(zf, "records/x", b"/etc/passwd", mode=0o120777), "symlink"),
    "fifo": (lambda zf, outside: _zip_member(zf, "records/x", b"", mode=0o010644), "fifo"),
    "backslash": (lambda zf, outside: _zip_member(zf, "..\\evil"), "backslash"),
    "twice": (lambda zf, outside: _zip_member(zf, "README.md"), "appears twice"),
}


@pytest.mark.parametrize("case", sorted(EVIL_ZIP))
def test_a_zip_with_one_unsafe_member_is_refused_whole(run, tmp_path, case):
    out = _make(run, tmp_path, ".zip")
    outside = tmp_path / "outside" / "evil"
    add, why = EVIL_ZIP[case]
    with zipfile.ZipFile(out, "a") as zf, pytest.warns(UserWarning) if case == "twice" else contextlib.nullcontext():
        add(zf, outside)
    name = zipfile.ZipFile(out).infolist()[-1].filename
    before = _tree(tmp_path)
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(out))
    _assert_refused(exc, str(out), repr(name), why)
    assert _tree(tmp_path) - before <= {f"tmp/actstore-bundles-{os.getuid()}"} and _cache_entries(tmp_path) == []
    assert not outside.exists() and not (tmp_path / "evil").exists()


def _zeros_zip(path: Path, size: int, method: int, level: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w", method, compresslevel=level) as zf:
        zf.writestr("README.md", b"a bundle, it says")
        zf.writestr("records/tokens/sae_id=x/part-0.parquet", bytes(size))
    return path


def test_a_zip_past_the_size_cap_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    bomb = _zeros_zip(tmp_path / "bomb.zip", 4 << 20, zipfile.ZIP_DEFLATED, level=1)  # 230:1, no bomb by ratio
    monkeypatch.setenv(bundle.MAX_BYTES_ENV, str(1 << 20))
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(bomb))
    _assert_refused(exc, str(bomb), "'records/tokens/sae_id=x/part-0.parquet'", bundle.MAX_BYTES_ENV)
    assert _cache_entries(tmp_path) == []
    monkeypatch.setenv(bundle.MAX_BYTES_ENV, "lots")
    with pytest.raises(UsageError, match=bundle.MAX_BYTES_ENV):
        bundle.open_bundle(str(bomb))


def test_a_zip_member_compressed_past_1000_to_1_is_refused(tmp_path):
    bomb = _zeros_zip(tmp_path / "bomb.zip", 8 << 20, zipfile.ZIP_BZIP2)  # a few hundred bytes on disk
    assert bomb.stat().st_size < 8 << 10
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(bomb))
    _assert_refused(exc, str(bomb), "'records/tokens/sae_id=x/part-0.parquet'", "zip bomb")
    assert _cache_entries(tmp_path) == [] and bundle.verify(str(bomb)) == [str(exc.value)]


def test_a_zip_whose_headers_understate_a_size_is_caught_while_copying(tmp_path, monkeypatch):
    lying = _zeros_zip(tmp_path / "lying.zip", 4 << 20, zipfile.ZIP_STORED)
    raw = bytearray(lying.read_bytes())
    central = raw.rfind(b"PK\x01\x02")  # the last member's central directory entry: say it unpacks to 10 bytes
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    lying.write_bytes(raw)
    monkeypatch.setenv(bundle.MAX_BYTES_ENV, str(1 << 20))  # the declared 10 bytes pass the cap; the copy stops
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(lying))
    _assert_refused(exc, str(lying), "records/tokens/sae_id=x/part-0.parquet")
    assert _cache_entries(tmp_path) == []


def test_an_archive_of_too_many_members_is_refused(run, tmp_path, monkeypatch):
    out = _make(run, tmp_path, ".tar")
    monkeypatch.setenv(bundle.MAX_MEMBERS_ENV, "5")
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(out))
    sixth = tarfile.open(out).getnames()[5]
    _assert_refused(exc, str(out), repr(sixth), bundle.MAX_MEMBERS_ENV)
    assert _cache_entries(tmp_path) == []


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_bundle_directory_with_a_symlink_or_fifo_is_refused(run, tmp_path, kind):
    out = _make(run, tmp_path)
    planted = out / "records" / "tokens" / f"sae_id={SAE_IDS[0]}" / "part-1.parquet"
    if kind == "symlink":
        planted.symlink_to("/etc/passwd")
    else:
        os.mkfifo(planted)  # a reader would wait on it forever
    for attempt in (lambda: bundle.open_bundle(str(out)), lambda: actstore.query(str(out), "summary")):
        with pytest.raises(StoreError) as exc:
            attempt()
        _assert_refused(exc, str(out), repr(planted.relative_to(out).as_posix()), kind)
    assert bundle.verify(str(out)) == [str(exc.value)]


@pytest.mark.parametrize("member", [TOKENS_PART, "README.md", "manifest.json"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_flipped_byte_anywhere_stops_queries(run, tmp_path, kind, member):
    out = _make(run, tmp_path, kind)
    _flip_byte(out, member)
    assert bundle.verify(str(out))  # what `actstore bundle verify` reports
    cached = _cache_entries(tmp_path)  # _flip_byte opened the archive before the flip
    with pytest.raises(StoreError) as exc:
        actstore.query(str(out), "summary")
    _assert_refused(exc, str(out), member)
    assert _cache_entries(tmp_path) == cached  # the damaged archive left no extraction behind


def _rehash(root: Path) -> None:
    """Bring manifest.json's sha256 and sizes in line with the files as they are now, as a tamperer would."""
    manifest = json.loads((root / "manifest.json").read_text())
    for name in manifest["files"]:
        with open(root / name, "rb") as f:
            sha, size = bundle._digest(f)
        manifest["files"][name] = {"sha256": sha, "size": size}
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
def test_a_bundles_own_sql_is_never_run(run, tmp_path, kind):
    out = _make(run, tmp_path, kind)

    def tamper(root: Path) -> None:
        for name in ("sql/summary.sql", "sql/_macros.sql", "views.sql"):
            (root / name).write_text("SELECT 'tampered' AS sae_id;\n")
        _rehash(root)

    _rewrite(out, tamper)
    assert bundle.verify(str(out)) == []  # the tampering is consistent: only the package's own SQL can tell
    got = actstore.query(str(out), "summary", n_boot=20)
    assert got.equals(actstore.query(str(run), "summary", n_boot=20)) and "tampered" not in got["sae_id"].to_list()


def test_a_cache_directory_others_can_write_is_refused(run, tmp_path):
    out = _make(run, tmp_path, ".zip")
    cache = bundle.open_bundle(str(out))
    cache.parent.chmod(0o777)
    with pytest.raises(StoreError) as exc:
        bundle.open_bundle(str(out))
    _assert_refused(exc, str(cache.parent), "TMPDIR")


def test_cli_sql_refuses_a_malicious_archive_in_one_line(run, tmp_path):
    from actstore.cli.main import main

    out = _make(run, tmp_path, ".tar")
    info, data = _tar_member("records/tokens/sae_id=x/part-0.parquet", tarfile.SYMTYPE, link="/etc/passwd")
    with tarfile.open(out, "a") as tf:
        tf.addfile(info)
    result = CliRunner().invoke(main, ["sql", str(out), "SELECT count(*) FROM tokens"])
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing ") and "'/etc/passwd'" in lines[0]
    assert "records/tokens/sae_id=x/part-0.parquet" in lines[0] and _cache_entries(tmp_path) == []
