"""The run directory: where each artefact of a run lives, how an SAE is named, how tables are read and written.

Why one owner: train, eval, darkmatter, layers, report and bundle all read and write the same directory,
and a collaborator's tools read it too. The layout:

    RUN/run.json                                  the train stores (and their models) the run's SAEs came from
    RUN/saes/<sae_id>/                            cfg.json, sae_weights.safetensors, fire_counts.safetensors
    RUN/checkpoints/<hook>.pt                     a sweep in progress (train)
    RUN/darkmatter/<sae_id>/probe.safetensors     the linear error probe (darkmatter)
    RUN/records/<table>/<key>=<value>/part-<part>.parquet   the records tables (actstore/tables.py); part 0,
                                                  or pos<P> for an eval patching position P only (kept beside it)
    RUN/report/                                   report.md, report.html, figures/

`sae_id` = `<hook>__k<k>_x<expansion>_<tokens>[_lr<lr>]_s<seed>` (tokens written like 1M or 250k; the
learning rate only when it was given, not the default recipe's) is built and parsed here only; every other module reads an SAE's hook, k, … from the `saes` table.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from actstore import atomic, integrity
from actstore.tables import SCHEMA_VERSION, TABLES, polars_schema
from actstore.units import format_count, parse_count

_SAE_ID = re.compile(
    r"^(?P<hook>.+)__k(?P<k>\d+)_x(?P<expansion>\d+)_(?P<tokens>\d+(\.\d)?[kMB]?)"
    r"(_lr(?P<lr>\d+(\.\d+)?(e-?\d+)?))?_s(?P<seed>\d+)$"
)


@dataclass(frozen=True)
class SAESpec:
    """What names an SAE of a sweep: the hook it reads and the sweep's axes."""

    hook: str
    k: int
    expansion: int
    tokens: int
    seed: int
    lr: float | None = None  # the peak learning rate; None: the default recipe's (actstore/trainee.py)

    @property
    def sae_id(self) -> str:
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return f"{self.hook}__k{self.k}_x{self.expansion}_{format_count(self.tokens)}{lr}_s{self.seed}"

    @classmethod
    def parse(cls, sae_id: str) -> SAESpec | None:
        """The spec an actstore `sae_id` names; None for any other name (an external SAE's directory)."""
        m = _SAE_ID.match(sae_id)
        if m is None:
            return None
        lr = float(m["lr"]) if m["lr"] else None
        return cls(m["hook"], int(m["k"]), int(m["expansion"]), parse_count(m["tokens"]), int(m["seed"]), lr)


def run_json(run: str | Path) -> Path:
    return Path(run) / "run.json"


def saes_dir(run: str | Path) -> Path:
    return Path(run) / "saes"


def sae_dir(run: str | Path, sae_id: str) -> Path:
    return saes_dir(run) / sae_id


def is_trained(run: str | Path, sae_id: str) -> bool:
    """An SAE is done once its weights are in place (they are swapped in last)."""
    return (sae_dir(run, sae_id) / "sae_weights.safetensors").is_file()


def recover(run: str | Path) -> None:
    """Tidy what a killed writer left in the parts of RUN that train, eval and darkmatter write (never the
    report, which `actstore report` builds without the run's lock). Call it holding the run's lock."""
    for part in ("saes", "checkpoints", "records", "darkmatter"):
        atomic.recover(Path(run) / part)


def trained_sae_dirs(run: str | Path) -> list[Path]:
    return sorted(p.parent for p in saes_dir(run).glob("*/cfg.json") if not atomic.is_staging(p.parent.name))


def checkpoint_path(run: str | Path, hook: str, store: str = "", share: str | None = None) -> Path:
    """One checkpoint directory per (train store, hook): two models' sweeps at one hook name never share it;
    under torchrun one per rank's share of the sweep (`share`, e.g. "1of4"), so a resume with the same
    number of ranks finds each rank's own. It holds `state.pt` and its SHA256SUMS, swapped in together."""
    suffix = f".{hash_key(str(store))}" if store else ""
    rank = f".rank{share}" if share else ""
    return Path(run) / "checkpoints" / f"{hook}{suffix}{rank}.ckpt"


def probe_path(run: str | Path, sae_id: str) -> Path:
    return Path(run) / "darkmatter" / sae_id / "probe.safetensors"


def report_dir(run: str | Path) -> Path:
    return Path(run) / "report"


def records_dir(run: str | Path) -> Path:
    return Path(run) / "records"


def table_dir(run: str | Path, table: str) -> Path:
    return records_dir(run) / table


def part_path(run: str | Path, table: str, key: str, part: str = "0") -> Path:
    """The Parquet file `part` of partition `key` (an sae_id, or a hash key) of `table`: part 0 holds the
    every-position evaluation, part pos<P> a single-position one, so a run keeps both side by side."""
    return table_dir(run, table) / f"{TABLES[table].partition}={key}" / f"part-{part}.parquet"


def hash_key(text: str) -> str:
    """A short stable partition key for tables keyed by a store path or a model name."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def part_files(run: str | Path, table: str) -> list[Path]:
    """A table's committed files (never a staging directory left by a killed write)."""
    found = table_dir(run, table).glob("*=*/part-*.parquet")
    return sorted(p for p in found if not atomic.is_staging(p.parent.name))


def conform(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` cast to the table's schema, columns in schema order; a column the schema lacks is an error,
    a schema column the frame lacks is written as NULLs (an external SAE has no seed, say)."""
    schema = polars_schema(table)
    partition = TABLES[table].partition
    extra = sorted(set(frame.columns) - set(schema) - {partition})
    if extra:
        raise ValueError(f"columns {extra} are not in the {table} schema (actstore/tables.py)")
    return frame.select(
        (pl.col(name) if name in frame.columns else pl.lit(None)).cast(dtype).alias(name)
        for name, dtype in schema.items()
    )


def write_tables(
    run: str | Path, key: str, frames: dict[str, pl.DataFrame], part: str = "0", share: tuple[int, int] | None = None
) -> None:
    """Replace file `part` of partition `key` of each table together: all written aside, then renamed into
    place. The partition's other parts (another evaluation mode) are carried over unchanged.

    `share` = (rank, ranks): this rank's rows of part `part` under torchrun, as `part-<part>~r<rank>of<ranks>`.
    Ranks write in turn, rank 0 first: rank 0 replaces every earlier file of the part, each later rank keeps
    those of the ranks before it (`_carried`)."""
    finals = [part_path(run, table, key).parent for table in frames]
    name = part_name(part, share)
    with atomic.replacing(*finals) as stages:
        for stage, final, (table, frame) in zip(stages, finals, frames.items(), strict=True):
            stage.mkdir(parents=True)
            carried = (
                [p.name for p in final.glob("part-*.parquet") if _carried(p.name, part, share)]
                if final.is_dir()
                else []
            )
            known = integrity.check(final, carried) if carried else {}  # never carry (and re-bless) damage
            for other in carried:
                _carry(final / other, stage / other)
            conform(table, frame).write_parquet(
                stage / name, compression="zstd", metadata={"actstore_schema": SCHEMA_VERSION}
            )
            integrity.seal(stage, known)


_SHARE = re.compile(r"^part-(?P<part>[^~]+?)(~r(?P<rank>\d+)of(?P<ranks>\d+))?\.parquet$")


def part_name(part: str, share: tuple[int, int] | None = None) -> str:
    """The file name of part `part`, or of one rank's share of it."""
    return f"part-{part}.parquet" if share is None else f"part-{part}~r{share[0]}of{share[1]}.parquet"


def has_part(run: str | Path, table: str, key: str, part: str = "0") -> bool:
    """Whether partition `key` of `table` holds part `part`, whole or in ranks' shares."""
    folder = part_path(run, table, key).parent
    return folder.is_dir() and any((m := _SHARE.match(p.name)) and m["part"] == part for p in folder.iterdir())


def _carried(name: str, part: str, share: tuple[int, int] | None) -> bool:
    """Whether writing `part` (or a rank's share of it) keeps the existing file `name`."""
    m = _SHARE.match(name)
    if m is None or m["part"] != part:
        return True  # another part (or a file we do not know: kept, never silently dropped)
    if share is None or m["rank"] is None:
        return False
    return int(m["ranks"]) == share[1] and int(m["rank"]) < share[0]


def check_records(run: str | Path, tables: list[str] | None = None) -> None:
    """A one-line StoreError naming the first records file that differs from its partition's SHA256SUMS
    (a Parquet reader would return its flipped values as data)."""
    root = records_dir(run)
    for table in tables or (sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []):
        for part in sorted({f.parent for f in part_files(run, table)}):
            integrity.check(part)


def _carry(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (files are never rewritten in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_table(run: str | Path, table: str) -> pl.DataFrame:
    """A whole table with its partition key as a column; empty (no columns) when the run has none."""
    files = part_files(run, table)
    if not files:
        return pl.DataFrame()
    check_records(run, [table])
    try:
        return pl.read_parquet(files, hive_partitioning=True)
    except pl.exceptions.SchemaError:  # files of an older schema beside newer ones: union by name
        parts = [pl.read_parquet(f).with_columns(pl.lit(f.parent.name.split("=", 1)[1]).alias(TABLES[table].partition))
                 for f in files]  # fmt: skip
        return pl.concat(parts, how="diagonal_relaxed")


def saes_row(
    *,
    model: str | None,
    hook: str,
    n_layers: int | None,
    d_model: int,
    d_sae: int,
    k: int | None,
    expansion: int,
    train_tokens: int | None,
    seed: int | None,
    architecture: str,
    path: str,
    lr: float | None = None,
    still_improving: float | None = None,
    undertrained: bool | None = None,
    data_seed: int | None = None,
    train_seconds: float | None = None,
) -> pl.DataFrame:
    """The `saes` row of one SAE (train writes it for ours when it saves one; eval for external SAEs)."""
    from actstore.model import hook_layer

    layer = hook_layer(hook)
    return pl.DataFrame(
        [
            {
                "model": model,
                "hook": hook,
                "layer": layer,
                "n_layers": n_layers,
                "depth": layer / n_layers if layer is not None and n_layers else None,
                "d_model": d_model,
                "d_sae": d_sae,
                "k": k,
                "expansion": expansion,
                "train_tokens": train_tokens,
                "seed": seed,
                "data_seed": data_seed,
                "architecture": architecture,
                "path": path,
                "lr": lr,
                "still_improving": still_improving,
                "undertrained": undertrained,
                "train_seconds": train_seconds,
            }
        ],
        schema=polars_schema("saes"),
    )
