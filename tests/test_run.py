"""The run directory's contracts: SAE names, the records tables' schemas, and atomic replacement."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pytest

from actstore import atomic
from actstore import run as rundir
from actstore.run import SAESpec
from actstore.tables import TABLES, empty_view_sql, polars_schema

BUDGETS = {1_000_000: "1M", 1_500_000: "1.5M", 250_000: "250k", 1000: "1k", 2_000_000_000: "2B", 1234: "1234"}


@pytest.mark.parametrize("tokens", sorted(BUDGETS))
@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_post", "blocks.10.attn.hook_z", "embed", "a__b.c"])
def test_sae_id_names_the_spec_and_parses_back(hook, tokens):
    spec = SAESpec(hook, k=32, expansion=8, tokens=tokens, seed=3)
    assert spec.sae_id == f"{hook}__k32_x8_{BUDGETS[tokens]}_s3"
    assert SAESpec.parse(spec.sae_id) == spec


def test_sae_ids_of_different_specs_differ():
    specs = {
        SAESpec(h, k, e, t, s)
        for h in ("blocks.1.hook_resid_post", "blocks.11.hook_resid_post")
        for k in (8, 16)
        for e in (4, 8)
        for t in (1000, 1_000_000, 1_500_000)
        for s in (0, 1)
    }
    assert len({s.sae_id for s in specs}) == len(specs)


@pytest.mark.parametrize(
    "name",
    [
        "blocks.1.hook_resid_post",  # a bare hook
        "my-external-sae",
        "gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82",
        "h__k32_x8_1M",  # no seed
        "h__k32_x8_1M_s0_extra",
        "h__kA_x8_1M_s0",
        "h__k32_x8_1G_s0",  # not our unit
        "__k32_x8_1M_s0",  # no hook
    ],
)
def test_parse_returns_none_for_foreign_names(name):
    assert SAESpec.parse(name) is None


@pytest.mark.parametrize("tokens", [16_100, 32_200, 64_100])
def test_one_decimal_budgets_round_trip(tokens):
    spec = SAESpec("blocks.0.hook_resid_post", 4, 2, tokens, 0)
    assert SAESpec.parse(spec.sae_id) == spec


def test_parse_returns_none_for_a_malformed_budget():
    assert SAESpec.parse("h__k4_x2_1.5.5M_s0") is None


# --- the tables -------------------------------------------------------------------------------------------

DUCKDB_TYPES = {"VARCHAR", "INTEGER", "SMALLINT", "BIGINT", "FLOAT", "DOUBLE", "BOOLEAN"}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_has_a_partition_key_and_typed_columns(table):
    t = TABLES[table]
    assert t.name == table and t.about and t.writer
    assert t.partition and t.partition not in t.names
    assert t.names and len(set(t.names)) == len(t.names)
    for c in t.columns:
        assert c.type in DUCKDB_TYPES and c.meaning.strip(), (table, c)
    assert list(polars_schema(table)) == t.names


@pytest.mark.parametrize("table", sorted(TABLES))
def test_the_empty_view_of_a_table_is_typed_and_empty(table):
    t = TABLES[table]
    rel = duckdb.sql(empty_view_sql(table))
    assert rel.columns == [t.partition, *t.names]
    assert [str(ty) for ty in rel.types] == ["VARCHAR", *[c.type for c in t.columns]]
    assert rel.fetchall() == []


def test_conform_casts_orders_and_fills_missing_columns_with_typed_nulls():
    frame = pl.DataFrame({"k": [32], "hook": ["blocks.2.hook_resid_post"], "train_tokens": [10**10], "sae_id": ["x"]})
    out = rundir.conform("saes", frame)
    schema = polars_schema("saes")
    assert out.columns == list(schema)  # schema order; the partition key is the directory's, not a column
    assert dict(out.schema) == schema
    row = out.row(0, named=True)
    assert (row["k"], row["hook"], row["train_tokens"]) == (32, "blocks.2.hook_resid_post", 10**10)
    missing = set(schema) - {"k", "hook", "train_tokens"}
    assert all(row[c] is None for c in missing)


def test_conform_refuses_a_column_outside_the_schema():
    with pytest.raises(ValueError, match=r"\['colour'\] are not in the saes schema"):
        rundir.conform("saes", pl.DataFrame({"hook": ["h"], "colour": ["red"]}))


def _curves(value: float) -> pl.DataFrame:
    return pl.DataFrame({"step": [1, 2], "fvu": [value, value / 2]})


def _saes(hook: str) -> pl.DataFrame:
    return pl.DataFrame({"hook": [hook], "k": [4]})


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if atomic.is_staging(p.name)]


def test_write_tables_writes_every_table_or_none(tmp_path, monkeypatch):
    run = tmp_path / "run"
    rundir.write_tables(run, "a", {"curves": _curves(0.5), "saes": _saes("old")})
    files = [rundir.part_path(run, t, "a") for t in ("curves", "saes")]
    before = [f.read_bytes() for f in files]

    calls = []
    real = pl.DataFrame.write_parquet

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        rundir.write_tables(run, "a", {"curves": _curves(0.1), "saes": _saes("new")})
    assert len(calls) == 2  # the first table was written (aside) before the second failed
    assert [f.read_bytes() for f in files] == before  # … and neither partition changed
    assert _leftovers(run) == []
    assert rundir.read_table(run, "curves")["fvu"].to_list() == [0.5, 0.25]

    monkeypatch.setattr(pl.DataFrame, "write_parquet", real)
    rundir.write_tables(run, "a", {"curves": _curves(0.1), "saes": _saes("new")})
    assert rundir.read_table(run, "curves")["fvu"].to_list() == pytest.approx([0.1, 0.05])
    assert rundir.read_table(run, "saes")["hook"].to_list() == ["new"]
    assert _leftovers(run) == []


def test_read_and_part_files_skip_staging_directories(tmp_path):
    run = tmp_path / "run"
    rundir.write_tables(run, "a", {"curves": _curves(0.5)})
    good = rundir.part_path(run, "curves", "a")
    for junk in ("sae_id=b.partial", "sae_id=c.old", "sae_id=a.old"):  # what a killed writer leaves
        (good.parent.parent / junk).mkdir()
        (good.parent.parent / junk / "part-0.parquet").write_bytes(good.read_bytes())
    assert rundir.part_files(run, "curves") == [good]
    assert rundir.read_table(run, "curves")["sae_id"].to_list() == ["a", "a"]
    assert rundir.part_files(run, "tokens") == [] and rundir.read_table(run, "tokens").is_empty()


def test_partitions_are_per_key_and_per_table(tmp_path):
    run = tmp_path / "run"
    rundir.write_tables(run, "a", {"curves": _curves(0.5)})
    rundir.write_tables(run, "b", {"curves": _curves(0.2), "saes": _saes("hb")})
    rundir.write_tables(run, "a", {"saes": _saes("ha")})  # adds a's saes row, leaves a's curves alone
    curves = rundir.read_table(run, "curves").sort("sae_id", "step")
    assert curves["sae_id"].to_list() == ["a", "a", "b", "b"]
    assert curves["fvu"].to_list() == pytest.approx([0.5, 0.25, 0.2, 0.1])
    assert dict(rundir.read_table(run, "saes").select("sae_id", "hook").iter_rows()) == {"a": "ha", "b": "hb"}


# --- atomic replacement -----------------------------------------------------------------------------------


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_replacing_swaps_a_directory_in_only_on_success(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic.replacing(final) as (stage,):
        assert stage != final and atomic.is_staging(stage.name)
        stage.mkdir()
        (stage / "new.txt").write_text("new")
        assert _tree(final) == {"old.txt": b"old"}  # nothing visible until the block ends
    assert _tree(final) == {"new.txt": b"new"}
    assert _leftovers(tmp_path) == []


def test_replacing_keeps_the_old_directory_on_an_exception(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic.replacing(final) as (stage,):
        stage.mkdir()
        (stage / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert _tree(final) == {"old.txt": b"old"}
    assert _leftovers(tmp_path) == []
    fresh = tmp_path / "never"
    with pytest.raises(KeyboardInterrupt), atomic.replacing(fresh) as (stage,):
        stage.write_text("x")
        raise KeyboardInterrupt
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_replacing_several_paths_is_all_or_nothing_and_clears_a_killed_writers_leftovers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b.json"
    a.mkdir()
    (a / "f").write_text("a0")
    b.write_text("b0")
    (tmp_path / "a.partial").mkdir()  # a writer killed while staging …
    (tmp_path / "a.partial" / "junk").write_text("junk")
    (tmp_path / "b.json.old").write_text("b-older")  # … and one killed mid-swap
    with pytest.raises(ValueError), atomic.replacing(a, b) as (sa, sb):
        assert not sa.exists()  # the stale stage was cleared before the block
        sa.mkdir()
        (sa / "f").write_text("a1")
        raise ValueError
    assert (a / "f").read_text() == "a0" and b.read_text() == "b0"
    with atomic.replacing(a, b) as (sa, sb):
        sa.mkdir()
        (sa / "f").write_text("a1")
        sb.write_text("b1")
    assert (a / "f").read_text() == "a1" and b.read_text() == "b1"
    assert _leftovers(tmp_path) == []


def test_write_bytes_replaces_a_file_whole(tmp_path):
    path = tmp_path / "m.json"
    atomic.write_bytes(path, b"one")
    atomic.write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_recover_restores_an_old_whose_final_is_missing_and_clears_the_rest(tmp_path):
    """A kill between swap_in's two renames leaves only NAME.old: the last complete version, renamed back.
    An .old beside its final, and every .partial, are leftovers and go."""
    records = tmp_path / "run" / "records" / "tokens"
    (records / "sae_id=a.old").mkdir(parents=True)
    (records / "sae_id=a.old" / "part-0.parquet").write_text("a, previous version")
    (records / "sae_id=b").mkdir()
    (records / "sae_id=b.old").mkdir()
    (records / "sae_id=c.partial").mkdir()
    (tmp_path / "run" / "report.partial").mkdir()  # report builds without the run's lock: not recover's
    rundir.recover(tmp_path / "run")
    assert (records / "sae_id=a" / "part-0.parquet").read_text() == "a, previous version"
    assert sorted(p.name for p in records.iterdir()) == ["sae_id=a", "sae_id=b"]
    assert (tmp_path / "run" / "report.partial").is_dir()
    atomic.recover(tmp_path / "missing")  # nothing there: nothing to do
