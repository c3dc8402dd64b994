-- Shared macros of the named queries. `actstore sql` loads this file first; in a bare duckdb shell run
-- `.read _macros.sql` once before reading a named query.

-- boot_counts(n, n_boot, seed): the bootstrap's resamples of n sequences, one row per resample b with
-- w[i] = how often sequence slot i (0-based, ordered by seq) was drawn; Σ w = n. Drawn with replacement
-- by a seeded hash, so the same query gives the same table (METHODS.md: 5,000 resamples of sequences).
-- A ratio statistic of a resample is then list_dot_product(w, per-sequence sums) over another such.
CREATE OR REPLACE MACRO boot_counts(n, n_boot, seed) AS TABLE
    WITH draws AS (
        SELECT b::INTEGER AS b, (hash(seed, b, j) % n)::INTEGER AS i, count(*)::DOUBLE AS c
        FROM range(n_boot) AS rb(b), range(n) AS rj(j)
        GROUP BY ALL
    )
    SELECT slot.b, list(coalesce(draws.c, 0) ORDER BY slot.i) AS w
    FROM (SELECT b::INTEGER AS b, i::INTEGER AS i FROM range(n_boot) AS rb(b), range(n) AS ri(i)) AS slot
    LEFT JOIN draws USING (b, i)
    GROUP BY slot.b;

-- ci(x): the 95% percentile interval of a bootstrap distribution, as [lo, hi].
CREATE OR REPLACE MACRO ci(x) AS quantile_cont(x, [0.025, 0.975]);
