-- Shared macros of the named queries. `actstore sql` loads this file first; in a bare duckdb shell run
-- `.read _macros.sql` once before reading a named query.

-- boot_counts(n, n_boot, seed): the bootstrap's resamples of n sequences, one row per resample b with
-- w[i] = how often sequence slot i (0-based, ordered by seq) was drawn; Σ w = n. Drawn with replacement
-- by a seeded hash, so the same query gives the same table (docs/METHODS.md: 5,000 resamples of sequences).
-- The hash is hashed again: DuckDB's multi-argument hash has structured low bits (for b = 0 and 1 its
-- parity is complementary across j), so `hash(seed, b, j) % n` alone is not a uniform draw for even n.
-- A ratio statistic of a resample is then list_dot_product(w, per-sequence sums) over another such.
CREATE OR REPLACE MACRO boot_counts(n, n_boot, seed) AS TABLE
    WITH draws AS (
        SELECT b::INTEGER AS b, (hash(hash(seed, b, j)) % n)::INTEGER AS i, count(*)::DOUBLE AS c
        FROM range(n_boot) AS rb(b), range(n) AS rj(j)
        GROUP BY ALL
    )
    SELECT slot.b, list(coalesce(draws.c, 0) ORDER BY slot.i) AS w
    FROM (SELECT b::INTEGER AS b, i::INTEGER AS i FROM range(n_boot) AS rb(b), range(n) AS ri(i)) AS slot
    LEFT JOIN draws USING (b, i)
    GROUP BY slot.b;

-- ci(x): the 95% percentile interval of a bootstrap distribution, as [lo, hi].
CREATE OR REPLACE MACRO ci(x) AS quantile_cont(x, [0.025, 0.975]);

-- nan_sum(x): sum(x), but NaN where every value is NULL (a column missing from an older file's records),
-- so a statistic over incomplete records is NaN rather than a silent partial sum.
CREATE OR REPLACE MACRO nan_sum(x) AS coalesce(sum(x), 'NaN'::DOUBLE);

-- sae_stats(min_pos, max_pos, n_boot, seed, boot_n): every ratio statistic of docs/METHODS.md per SAE, from
-- sums over the tokens at positions min_pos…max_pos: one row with b = -1 on all sequences, then one row
-- per resample b of the SAEs evaluated on boot_n sequences (the same draws for all of them: paired).
CREATE OR REPLACE MACRO sae_stats(min_pos, max_pos, n_boot, seed, boot_n) AS TABLE
    WITH per_seq AS (  -- the bootstrap's unit: one row of sums per SAE and sequence
        SELECT sae_id, seq,
            count(*)::DOUBLE AS n, count(kl_patched)::DOUBLE AS n_kl,
            nan_sum(sse) AS sse, nan_sum(sst) AS sst, nan_sum(ce_orig) AS ce_orig, nan_sum(ce_patched) AS ce_patched,
            nan_sum(ce_zero) AS ce_zero, nan_sum(kl_patched) AS kl, nan_sum(kl_zero) AS kl_zero, nan_sum(cos) AS cos,
            nan_sum(relerr) AS relerr, nan_sum(l0) AS l0, nan_sum(rate_bits) AS rate
        FROM tokens
        WHERE pos BETWEEN min_pos AND max_pos
        GROUP BY ALL
    ),
    per_sae AS (  -- totals give the estimates; per-sequence lists in seq order feed the resamples
        SELECT sae_id, count(*) AS n_seq,
            sum(n) AS n, sum(n_kl) AS n_kl, sum(sse) AS sse, sum(sst) AS sst, sum(ce_orig) AS ce_orig,
            sum(ce_patched) AS ce_patched, sum(ce_zero) AS ce_zero, sum(kl) AS kl, sum(kl_zero) AS kl_zero,
            sum(cos) AS cos, sum(relerr) AS relerr, sum(l0) AS l0, sum(rate) AS rate,
            list(n ORDER BY seq) AS l_n, list(n_kl ORDER BY seq) AS l_n_kl, list(sse ORDER BY seq) AS l_sse,
            list(sst ORDER BY seq) AS l_sst, list(ce_orig ORDER BY seq) AS l_ce_orig,
            list(ce_patched ORDER BY seq) AS l_ce_patched, list(ce_zero ORDER BY seq) AS l_ce_zero,
            list(kl ORDER BY seq) AS l_kl, list(kl_zero ORDER BY seq) AS l_kl_zero, list(cos ORDER BY seq) AS l_cos,
            list(relerr ORDER BY seq) AS l_relerr, list(l0 ORDER BY seq) AS l_l0, list(rate ORDER BY seq) AS l_rate
        FROM per_seq
        GROUP BY sae_id
    ),
    resampled AS (  -- Σ_i w_i · (sequence i's sums) for every resample
        SELECT sae_id, b,
            list_dot_product(w, l_n) AS n, list_dot_product(w, l_n_kl) AS n_kl,
            list_dot_product(w, l_sse) AS sse, list_dot_product(w, l_sst) AS sst,
            list_dot_product(w, l_ce_orig) AS ce_orig, list_dot_product(w, l_ce_patched) AS ce_patched,
            list_dot_product(w, l_ce_zero) AS ce_zero, list_dot_product(w, l_kl) AS kl,
            list_dot_product(w, l_kl_zero) AS kl_zero, list_dot_product(w, l_cos) AS cos,
            list_dot_product(w, l_relerr) AS relerr, list_dot_product(w, l_l0) AS l0,
            list_dot_product(w, l_rate) AS rate
        FROM boot_counts(boot_n, n_boot, seed), per_sae  -- resamples on the streamed side: parallel
        WHERE n_seq = boot_n
    )
    SELECT sae_id, b, n_seq, n AS n_tokens,
        1 - sse / sst AS r2,
        2 - ce_patched / ce_orig AS ce_rec,
        (ce_zero - ce_patched) / (ce_zero - ce_orig) AS ce_loss_recovered,
        kl / n_kl AS kl,
        (kl_zero - kl) / kl_zero AS kl_score,
        cos / n AS cos,
        relerr / n AS relerr,
        sse / n AS sse_per_token,
        l0 / n AS l0,
        rate / n AS rate_bits
    FROM (SELECT -1 AS b, * EXCLUDE (l_n, l_n_kl, l_sse, l_sst, l_ce_orig, l_ce_patched, l_ce_zero, l_kl,
                                      l_kl_zero, l_cos, l_relerr, l_l0, l_rate) FROM per_sae
          UNION ALL BY NAME
          SELECT *, boot_n AS n_seq FROM resampled);

-- boot_n(): the most common number of evaluated sequences per SAE: the SAEs whose CIs are computed.
CREATE OR REPLACE MACRO boot_n() AS (SELECT mode(n) FROM (SELECT count(DISTINCT seq) AS n FROM tokens GROUP BY sae_id));

-- baseline_kl(): the KL of every token under the SAE's patch and under each baseline, one row per
-- (token, baseline). The baselines are the tokens table's kl_* columns other than kl_patched and kl_zero:
-- the list in actstore/tables.py (BASELINES) decides which columns eval writes, and this reads them
-- whatever they are. NULL KLs (the last position) are left out.
CREATE OR REPLACE MACRO baseline_kl() AS TABLE
    SELECT sae_id, seq, pos, token, kl_patched, replace(baseline, 'kl_', '') AS baseline, kl_base
    FROM (
        UNPIVOT (SELECT sae_id, seq, pos, token, kl_patched,
                     COLUMNS(lambda c: starts_with(c, 'kl_') AND c NOT IN ('kl_patched', 'kl_zero'))
                 FROM tokens WHERE kl_patched IS NOT NULL)
        ON COLUMNS(lambda c: starts_with(c, 'kl_') AND c NOT IN ('kl_patched', 'kl_zero'))
        INTO NAME baseline VALUE kl_base
    );

-- mismatch(d_r2, d_ce_rec): study 000's indicator: R² improves while behaviour (CE_rec) gets worse.
CREATE OR REPLACE MACRO mismatch(d_r2, d_ce_rec) AS d_r2 > 0 AND d_ce_rec < 0;
