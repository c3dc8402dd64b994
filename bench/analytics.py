"""The `summary` query's bootstrap in DuckDB vs a vectorised numpy bootstrap vs scipy; memory at 100×.

    python bench/analytics.py [--scales 1,100] [--dir DIR] [--repeats 5] [--quick]

Synthetic records (seeded numpy, every column eval writes, so file sizes are realistic): 36 SAEs × 200
sequences × 256 positions (the seed's scale, 1×) and 100× that (184M token rows), generated once under DIR
and reused. Codes (k rows per token; billions at 100×) cover only the first 200 sequences at every scale,
so at 100× they are a 1% sample; `alive` over all positions reads the latents table (firing counts eval
writes), as the summary does; the alive sub-query's own time is shown. Each measured in a child
process (peak RSS: its ru_maxrss): (a) SQL: `actstore.analytics.query(run, "summary")` end to end, 5,000
resamples; (b) numpy: the same statistics and `alive` from the Parquet files (pyarrow read, per-sequence
sums, resample counts drawn in blocks, one matmul per block, percentiles): its point estimates must equal
SQL's, its CIs differ by Monte Carlo error only; (c) `scipy.stats.bootstrap` (percentile, 5,000 resamples
of sequences, paired per-sequence sums, vectorized, all ten statistics) for each SAE at 1×, reads included.
Goal: SQL at 1× well under a second and within 2× of numpy; peak RSS at 100× far below the records'.
CPU seconds (user + system, all threads, medians) are shown beside wall time: on a shared machine the
wall-time ratio moves with the load (DuckDB runs on every core, numpy mostly on one); the CPU ratio does not.
The last line is one JSON object of the headline figures.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq

import actstore.analytics as an
from actstore import run as rec

GOAL = 2.0  # the summary's bootstrap in SQL within 2× of a vectorised numpy one, at 1×
N_BOOT, SEQ_LEN, BASE_SEQS, D_MODEL, D_SAE = 5000, 256, 200, 512, 4096
SAES = [(layer, k, s) for layer in (1, 3, 5) for k in (8, 16, 32, 64) for s in (0, 1, 2)]  # 36
SUMS = "n n_kl sse sst ce_orig ce_patched ce_zero kl_patched kl_zero cos relerr l0 rate_bits".split()  # per sequence
STATS = "r2 ce_rec ce_loss_recovered kl kl_score cos relerr mse l0 rate_bits".split()  # the summary's, with CIs
HEADLINE = dict(sql_vs_numpy="SQL / numpy", scipy_vs_sql="scipy / SQL", sql_s="SQL summary s", numpy_s="numpy s")
HEADLINE |= dict(sql_vs_numpy_cpu="SQL / numpy CPU", sql_cpu_s="SQL CPU s", numpy_cpu_s="numpy CPU s")
HEADLINE |= dict(numpy_no_alive_s="numpy s, no alive", scipy_s="scipy s", peak_rss_mb="SQL peak RSS MB")
HEADLINE |= dict(numpy_peak_rss_mb="numpy peak RSS MB", records_mb="records on disk MB")  # JSON key: table row


def frames(layer: int, k: int, seed: int, n_seq: int, seq_fx: np.ndarray) -> dict[str, pl.DataFrame]:
    """One SAE's records: tokens for n_seq sequences, codes for the first BASE_SEQS of them."""
    rng = np.random.default_rng([layer, k, seed, n_seq])
    n, f32 = n_seq * SEQ_LEN, np.float32
    seq, pos = np.repeat(np.arange(n_seq, dtype=np.int32), SEQ_LEN), np.tile(np.arange(SEQ_LEN, dtype=np.int16), n_seq)
    fx = seq_fx[seq]  # per-sequence difficulty shared by all SAEs: what makes sequences the unit

    def gamma(shape, scale):
        return rng.standard_gamma(shape, n, dtype=f32) * f32(scale)

    def noise(sigma):
        return np.exp(f32(sigma) * rng.standard_normal(n, dtype=f32))

    sst = gamma(1.5, 125) * fx
    frac = f32(0.04 * (8 / k) ** 0.5 * (1 + layer / 10)) * noise(0.4)  # ‖e‖²/‖x−x̄‖², i.e. 1 − R²
    sse, x_norm = sst * frac, np.sqrt(sst * f32(1.2))
    recon = x_norm * np.sqrt(np.clip(1 - frac, 0, 1))
    dot = (x_norm**2 + recon**2 - sse) / 2
    ce_orig, last, kl_scale = gamma(0.3, 1.4) * fx, pos == SEQ_LEN - 1, float(frac.mean()) * 0.1
    token = rng.integers(10, 50304, n, dtype=np.int32)
    cols = dict(seq=seq, pos=pos, token=token, next_token=np.where(last, -1, np.roll(token, -1)))
    cols |= dict(ce_orig=ce_orig, ce_zero=gamma(5, 1.25) * fx**0.3, kl_zero=gamma(5, 1.17), x_norm=x_norm)
    cols |= dict(recon_norm=recon, err_norm=np.sqrt(sse), sse=sse, sst=sst, dot=dot, cos=dot / (x_norm * recon))
    cols |= dict(relerr=np.sqrt(sse) / x_norm, l0=np.full(n, k, f32))
    cols |= dict(ce_patched=ce_orig * (1 + frac * noise(0.5)) + gamma(0.5, kl_scale), kl_patched=gamma(0.5, kl_scale))
    for patch in ("eps", "samecos", "actdiff"):
        cols |= {f"ce_{patch}": ce_orig + gamma(0.5, kl_scale / 3), f"kl_{patch}": gamma(0.5, kl_scale / 3)}
    cols["rate_bits"] = f32(k * (np.log2(D_SAE) + 5)) + f32(9) * rng.standard_normal(n, dtype=f32)
    ce_at_last = pl.when(pl.col("pos") < SEQ_LEN - 1).then(pl.col("^ce_.*$")).name.keep()  # no next token: NULL
    tokens = pl.DataFrame(cols).with_columns(ce_at_last, store=pl.lit("bench/eval.zarr"))
    n_codes, n_alive = min(n_seq, BASE_SEQS) * SEQ_LEN * k, int(D_SAE * (0.6 + 0.4 * rng.random()))
    latent = rng.permutation(D_SAE).astype(np.int32)[(n_alive * rng.random(n_codes) ** 2).astype(np.int64)]
    codes = pl.DataFrame(dict(seq=np.repeat(seq[: n_codes // k], k), pos=np.repeat(pos[: n_codes // k], k)))
    codes = codes.with_columns(latent=latent, value=rng.standard_gamma(2, n_codes, dtype=f32) * f32(0.9))
    fires = np.bincount(latent, minlength=D_SAE)
    latents = dict(latent=np.arange(D_SAE, dtype=np.int32), fires=fires, firing_rate=fires / n_codes * k)
    latents = pl.DataFrame(latents).with_columns(dec_norm=pl.lit(1.0, pl.Float32))
    saes = dict(model="pythia-70m", hook=f"blocks.{layer}.hook_resid_post", layer=layer, d_model=D_MODEL, d_sae=D_SAE)
    saes |= dict(
        k=k, expansion=8, train_tokens=1_000_000, seed=seed, architecture="topk", path=f"saes/{layer}-{k}-{seed}"
    )
    return {"tokens": tokens, "saes": pl.DataFrame([saes]), "codes": codes, "latents": latents}


def ensure_records(root: Path, scale: int) -> Path:
    run, n_seq = root / f"x{scale}", BASE_SEQS * scale
    params = dict(version=2, saes=len(SAES), n_seq=n_seq, seq_len=SEQ_LEN, d_sae=D_SAE)  # bump version on changes
    marker = run / "bench-params.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return run
    seq_fx, t0 = np.random.default_rng(n_seq).lognormal(0, 0.3, n_seq).astype(np.float32), time.perf_counter()
    for i, (layer, k, seed) in enumerate(SAES):
        sae_id = f"blocks.{layer}.hook_resid_post__k{k}_x8_1M_s{seed}"
        rec.write_tables(run, sae_id, frames(layer, k, seed, n_seq, seq_fx))
        print(f"  generating x{scale}: {i + 1}/{len(SAES)} SAEs ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    marker.write_text(json.dumps(params))
    return run


def per_seq_sums(path: Path) -> np.ndarray:
    """One SAE's tokens file → (n_seq, len(SUMS)) sums per sequence, in seq order (nulls count as 0)."""
    t = pq.read_table(path, columns=["seq", *SUMS[2:]])
    seq = t["seq"].to_numpy()
    present = np.bincount(seq) > 0
    out = [np.bincount(seq), np.bincount(seq[pc.is_valid(t["kl_patched"]).to_numpy(zero_copy_only=False)])]
    out += [np.bincount(seq, pc.fill_null(t[c], 0).to_numpy()) for c in SUMS[2:]]
    return np.stack([np.pad(o, (0, len(present) - len(o))) for o in out], -1)[present]


def ratios(s: np.ndarray) -> np.ndarray:
    """Sums (…, len(SUMS)) → the summary's ten ratio statistics (…, len(STATS)), mse without / d_model."""
    g = dict(zip(SUMS, np.moveaxis(s, -1, 0), strict=True))
    n = g["n"]
    return np.stack([1 - g["sse"] / g["sst"], 2 - g["ce_patched"] / g["ce_orig"],
                     (g["ce_zero"] - g["ce_patched"]) / (g["ce_zero"] - g["ce_orig"]), g["kl_patched"] / g["n_kl"],
                     (g["kl_zero"] - g["kl_patched"]) / g["kl_zero"], g["cos"] / n, g["relerr"] / n, g["sse"] / n,
                     g["l0"] / n, g["rate_bits"] / n], -1)  # fmt: skip


def numpy_summary(run: Path, n_boot: int = N_BOOT, seed: int = 0, alive: bool = True) -> pl.DataFrame:
    """The summary's statistics with numpy. Assumes every SAE was evaluated on the same sequences."""
    files = rec.part_files(run, "tokens")
    ids = [p.parent.name.split("=", 1)[1] for p in files]
    sums = np.stack([per_seq_sums(p) for p in files], 1)  # (n_seq, n_sae, len(SUMS))
    n_seq, flat = sums.shape[0], sums.reshape(sums.shape[0], -1)
    rng, boot, block = np.random.default_rng(seed), np.empty((n_boot, flat.shape[1])), 250
    for b0 in range(0, n_boot, block):  # w[b, i] = times sequence i is drawn in resample b; Σ_i w = n_seq
        nb = min(block, n_boot - b0)
        draws = rng.integers(0, n_seq, (nb, n_seq)) + n_seq * np.arange(nb)[:, None]
        boot[b0 : b0 + nb] = np.bincount(draws.ravel(), minlength=nb * n_seq).reshape(nb, n_seq) @ flat
    stats = ratios(boot.reshape(n_boot, *sums.shape[1:]))  # (n_boot, n_sae, len(STATS))
    lo, hi = np.quantile(stats, [0.025, 0.975], axis=0)
    est = ratios(sums.sum(0))
    d = {r["sae_id"]: (r["d_model"], r["d_sae"]) for r in rec.read_table(run, "saes").iter_rows(named=True)}
    for a in (est, lo, hi):
        a[:, STATS.index("mse")] /= [d[i][0] for i in ids]
    out = {s + x: a[:, j] for j, s in enumerate(STATS) for x, a in (("", est), ("_lo", lo), ("_hi", hi))}
    if alive:  # latents that fired / d_sae, from the latents table (what the summary reads over all positions)
        files = {p.parent.name.split("=", 1)[1]: p for p in rec.part_files(run, "latents")}
        fires = (pq.read_table(files[i], columns=["fires"])["fires"].to_numpy() for i in ids)
        out["alive"] = [np.count_nonzero(f) / d[i][1] for i, f in zip(ids, fires, strict=True)]
    return pl.DataFrame({"sae_id": ids} | out)


def scipy_all(run: Path, np_df: pl.DataFrame) -> tuple[float, float]:
    """Seconds of scipy.stats.bootstrap for every SAE (read included); max |Δ| of its CIs vs numpy's."""
    from scipy.stats import bootstrap

    def statistic(*c, axis=-1):
        return np.moveaxis(ratios(np.stack([x.sum(axis) for x in c], -1)), -1, 0)

    t0, cis, files = time.perf_counter(), [], rec.part_files(run, "tokens")
    for path in files:
        res = bootstrap(tuple(per_seq_sums(path).T), statistic, paired=True, vectorized=True,
                        method="percentile", n_resamples=N_BOOT, rng=0)  # fmt: skip
        cis.append(np.array(res.confidence_interval) / np.where(np.array(STATS) == "mse", D_MODEL, 1))
    secs, diff = time.perf_counter() - t0, 0.0
    for path, ci in zip(files, cis, strict=True):
        ref = np_df.row(by_predicate=pl.col("sae_id") == path.parent.name.split("=", 1)[1], named=True)
        diff = max(diff, np.abs(ci - [[ref[f"{s}_{e}"] for s in STATS] for e in ("lo", "hi")]).max())
    return secs, diff


def cpu_s() -> float:
    """This process's CPU seconds (all threads): steadier than wall time on a shared, loaded machine."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def child(kind: str, run: str, repeats: int, out: str) -> None:
    """Run one measurement `repeats` times in this (fresh) process; print wall and CPU times and peak RSS."""
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_s()
        if kind == "sql":
            df = an.query(run, "summary", n_boot=N_BOOT, seed=0)
        elif kind == "sql_alive":  # the summary's `alive` CTE alone (all positions: the latents table)
            df = an.sql(run, "SELECT sae_id, count(*) FILTER (WHERE fires > 0) AS n FROM latents GROUP BY sae_id")
        else:
            df = numpy_summary(Path(run), alive=kind == "numpy")
        times.append(time.perf_counter() - t0)
        cpus.append(cpu_s() - c0)
    df.write_parquet(out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(times=times, cpus=cpus, rss_mb=rss)))


CPU: dict[tuple[str, str], float] = {}  # (kind, run) → median CPU seconds of its last measurement


def measure(kind: str, run: Path, repeats: int) -> tuple[float | None, float | None, pl.DataFrame | None]:
    """(median seconds, peak RSS MB, result) of a child process; Nones (and the error on stderr) if it fails.
    The median CPU seconds go to CPU."""
    out = Path(tempfile.mkdtemp()) / "result.parquet"
    cmd = [sys.executable, __file__, "--child", kind, str(run), str(repeats), str(out)]
    try:  # the child's stderr (tracebacks) goes to ours
        res = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600).stdout.splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:  # reported, never raised
        print(f"{kind} on {run} failed: {exc!r}", file=sys.stderr)
        return None, None, None
    CPU[kind, str(run)] = float(np.median(res["cpus"]))
    return float(np.median(res["times"])), res["rss_mb"], pl.read_parquet(out)


def compare(sql: pl.DataFrame, npy: pl.DataFrame) -> tuple[float, float, float]:
    """Max relative difference of point estimates, max |Δ| of CI bounds, and that over the CI's width."""
    j = sql.join(npy, on="sae_id", suffix="_np")
    rel = max((j[s] - j[f"{s}_np"]).abs().max() / j[s].abs().max() for s in [*STATS, "alive"])
    diff = {(s, e): (j[f"{s}_{e}"] - j[f"{s}_{e}_np"]).abs() for s in STATS for e in ("lo", "hi")}
    width = {s: j[f"{s}_hi"] - j[f"{s}_lo"] for s in STATS}
    ci_w = max((d / width[s]).max() for (s, _), d in diff.items() if s != "l0")  # l0 is constant per token
    return rel, max(d.max() for d in diff.values()), ci_w


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.parquet")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,100")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "actstore-bench-analytics"))
    ap.add_argument("--repeats", type=int, default=5, help="at 1×; one run at larger scales")
    ap.add_argument("--quick", action="store_true", help="1× only")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
    scales, rows, head = [1] if args.quick else [int(s) for s in args.scales.split(",")], [], {}
    for scale in scales:
        run, reps = ensure_records(Path(args.dir), scale), args.repeats if scale == 1 else 1
        (sql_s, sql_mb, sql_df), (np_s, np_mb, np_df) = measure("sql", run, reps), measure("numpy", run, reps)
        ok, n_tok = sql_df is not None and np_df is not None, len(SAES) * BASE_SEQS * scale * SEQ_LEN
        n_cols = len(pq.read_schema(rec.part_files(run, "tokens")[0]).names)
        row = {"scale": f"{scale}×", "token rows": f"{n_tok / 1e6:.1f}M", "SQL summary s": sql_s, "numpy s": np_s}
        row |= {"SQL / numpy": sql_s / np_s if ok else None, "SQL alive part s": measure("sql_alive", run, reps)[0]}
        cpu = (CPU.get(("sql", str(run))), CPU.get(("numpy", str(run))))
        row |= {"SQL CPU s": cpu[0], "numpy CPU s": cpu[1], "SQL / numpy CPU": cpu[0] / cpu[1] if ok else None}
        if scale == 1 and ok:
            row["numpy s, no alive"] = measure("numpy_stats", run, reps)[0]
            scipy_s, ci_diff = sorted(scipy_all(run, np_df) for _ in range(reps))[reps // 2]
            row |= {"scipy s": scipy_s, "scipy / SQL": scipy_s / sql_s, "scipy CI abs diff": ci_diff}
        row |= {"SQL peak RSS MB": sql_mb, "numpy peak RSS MB": np_mb, "records on disk MB": du_mb(run / "records")}
        row |= {"codes on disk MB": du_mb(run / "records" / "codes"), "tokens loaded MB": n_tok * n_cols * 4 / 2**20}
        row |= {"13 cols loaded MB": n_tok * 13 * 4 / 2**20}
        rows.append(row | dict(zip(("point max rel diff", "CI max abs diff", "CI diff / width"),
                                   compare(sql_df, np_df) if ok else (None,) * 3, strict=True)))  # fmt: skip
        head |= {f"{h}_{scale}x": row.get(key) for h, key in HEADLINE.items()}
    print(f"{'':22}" + "".join(f"{r['scale']:>12}" for r in rows))
    for key in list(dict.fromkeys(k for r in rows for k in r))[1:]:
        cells = [v if isinstance(v, str) else "n/a" if v is None else f"{v:.4g}" for v in (r.get(key) for r in rows)]
        print(f"{key:22}" + "".join(f"{c:>12}" for c in cells))
    print(f"records: 36 SAEs × 200·scale seqs × 256 positions in {args.dir}; codes: first 200 seqs (1% at 100×).")
    print("Medians of the repeats. scipy: all 36 SAEs, numpy's seeded generator (same draws, so equal CIs); SQL vs")
    print("numpy CIs (max over SAEs and statistics, mse per d_model) differ by Monte Carlo error: SQL draws by hash.")
    head = {k: round(v, 4) for k, v in head.items() if v is not None}
    if "sql_vs_numpy_1x" in head:
        print(f"SQL / numpy at 1×: {head['sql_vs_numpy_1x']} (goal ≤ {GOAL})")
        head["goal"] = GOAL
    print(json.dumps(dict(sorted(head.items(), key=lambda kv: "_vs_" not in kv[0]))))  # ratios first


if __name__ == "__main__":
    main()
