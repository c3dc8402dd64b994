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
-- SST is centred on the mean of the selected positions: each token's sst (centred on the mean over all
-- positions, μ) less ‖μ_sel − μ‖², from the `positions` table's per-position sums (docs/METHODS.md). Records
-- without those sums give NaN R² under a position filter rather than an R² inflated by n‖μ_sel − μ‖².
-- ce_rec_seq is the mean over sequences of each sequence's own CE_rec (study 000's per-unit score), and
-- ce_rec_seq_sd their standard deviation; ce_rec is the pooled ratio of sums.
CREATE OR REPLACE MACRO sae_stats(min_pos, max_pos, n_boot, seed, boot_n) AS TABLE
    WITH shift AS (  -- ‖μ_sel − μ‖² per eval store and hook: Σ_dim (Σ_sel (x − μ)_dim / n_sel)²
        SELECT store, hook, sum(m * m) AS shift2
        FROM (SELECT store, hook, dim, sum(dev_sum) / sum(n) AS m
              FROM positions WHERE pos BETWEEN min_pos AND max_pos GROUP BY ALL)
        GROUP BY ALL
    ),
    seq_sums AS (  -- the bootstrap's unit: one row of sums per SAE and sequence
        SELECT sae_id, seq, any_value(store) AS store,
            count(*)::DOUBLE AS n, count(kl_patched)::DOUBLE AS n_kl,
            nan_sum(sse) AS sse, nan_sum(sst) AS sst_all, nan_sum(ce_orig) AS ce_orig, nan_sum(ce_patched) AS ce_patched,
            nan_sum(ce_zero) AS ce_zero, nan_sum(kl_patched) AS kl, nan_sum(kl_zero) AS kl_zero, nan_sum(cos) AS cos,
            nan_sum(relerr) AS relerr, nan_sum(l0) AS l0, nan_sum(rate_bits) AS rate,
            nan_sum(rate_bits - (lgamma(l0 + 1) / ln(2))::FLOAT) AS rate_set,  -- the set coder: log₂(l0!) fewer bits
            nan_sum((recon_norm / (x_norm + 1e-10))::FLOAT) AS l2_ratio,  -- float32 terms: exact sums, any order
            2 - nan_sum(ce_patched) / nan_sum(ce_orig) AS ce_rec_seq
        FROM tokens
        WHERE pos BETWEEN min_pos AND max_pos
        GROUP BY sae_id, seq
    ),
    per_seq AS (  -- sst re-centred: Σ_seq ‖x − μ_sel‖² = Σ_seq ‖x − μ‖² − n_seq ‖μ_sel − μ‖² summed over sequences
        SELECT q.* EXCLUDE (sst_all, store),
            q.sst_all - q.n * coalesce(sh.shift2, CASE WHEN min_pos <= 0 AND max_pos >= 32767 THEN 0 ELSE 'NaN'::DOUBLE END) AS sst
        FROM seq_sums AS q
        LEFT JOIN saes AS s ON s.sae_id = q.sae_id
        LEFT JOIN shift AS sh ON sh.store = q.store AND sh.hook = s.hook
    ),
    per_sae AS (  -- totals give the estimates; per-sequence lists in seq order feed the resamples
        SELECT sae_id, count(*) AS n_seq,
            sum(n) AS n, sum(n_kl) AS n_kl, sum(sse) AS sse, sum(sst) AS sst, sum(ce_orig) AS ce_orig,
            sum(ce_patched) AS ce_patched, sum(ce_zero) AS ce_zero, sum(kl) AS kl, sum(kl_zero) AS kl_zero,
            sum(cos) AS cos, sum(relerr) AS relerr, sum(l0) AS l0, sum(rate) AS rate, sum(rate_set) AS rate_set,
            sum(l2_ratio) AS l2_ratio,
            list_sum(list(ce_rec_seq ORDER BY seq)) AS ce_rec_seq,  -- in seq order: the same digits every time
            list_aggregate(list(ce_rec_seq ORDER BY seq), 'stddev_samp') AS ce_rec_seq_sd,
            list(n ORDER BY seq) AS l_n, list(n_kl ORDER BY seq) AS l_n_kl, list(sse ORDER BY seq) AS l_sse,
            list(sst ORDER BY seq) AS l_sst, list(ce_orig ORDER BY seq) AS l_ce_orig,
            list(ce_patched ORDER BY seq) AS l_ce_patched, list(ce_zero ORDER BY seq) AS l_ce_zero,
            list(kl ORDER BY seq) AS l_kl, list(kl_zero ORDER BY seq) AS l_kl_zero, list(cos ORDER BY seq) AS l_cos,
            list(relerr ORDER BY seq) AS l_relerr, list(l0 ORDER BY seq) AS l_l0, list(rate ORDER BY seq) AS l_rate,
            list(l2_ratio ORDER BY seq) AS l_l2_ratio, list(ce_rec_seq ORDER BY seq) AS l_ce_rec_seq,
            list(rate_set ORDER BY seq) AS l_rate_set
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
            list_dot_product(w, l_rate) AS rate, list_dot_product(w, l_l2_ratio) AS l2_ratio,
            list_dot_product(w, l_ce_rec_seq) AS ce_rec_seq, list_dot_product(w, l_rate_set) AS rate_set
        FROM boot_counts(boot_n, n_boot, seed), per_sae  -- resamples on the streamed side: parallel
        WHERE n_seq = boot_n
    )
    SELECT sae_id, b, n_seq, n AS n_tokens,
        1 - sse / sst AS r2,
        2 - ce_patched / ce_orig AS ce_rec,
        ce_rec_seq / n_seq AS ce_rec_seq,
        ce_rec_seq_sd,
        (ce_zero - ce_patched) / (ce_zero - ce_orig) AS ce_loss_recovered,
        kl / n_kl AS kl,
        (kl_zero - kl) / kl_zero AS kl_score,
        cos / n AS cos,
        relerr / n AS relerr,
        sse / n AS sse_per_token,
        sst / n AS sst_per_token,
        l2_ratio / n AS l2_ratio,
        l0 / n AS l0,
        rate / n AS rate_bits,
        rate_set / n AS rate_bits_set
    FROM (SELECT -1 AS b, * EXCLUDE (l_n, l_n_kl, l_sse, l_sst, l_ce_orig, l_ce_patched, l_ce_zero, l_kl,
                                      l_kl_zero, l_cos, l_relerr, l_l0, l_rate, l_l2_ratio, l_ce_rec_seq, l_rate_set)
          FROM per_sae
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
-- NULL when either is NaN (an R² without the positions it needs): DuckDB orders NaN above every number.
CREATE OR REPLACE MACRO mismatch(d_r2, d_ce_rec) AS
    CASE WHEN isnan(d_r2) OR isnan(d_ce_rec) THEN NULL ELSE d_r2 > 0 AND d_ce_rec < 0 END;

-- model_order(): the run's models from the smaller to the larger: by width (d_model), then by depth
-- (n_layers), then by name. Cross-model queries take side a = the smaller and b = the larger, so that
-- Δ = X(larger) − X(smaller) as in study 000, whatever the names' text order.
CREATE OR REPLACE MACRO model_order() AS TABLE
    SELECT model, max(d_model) AS d_model, max(n_layers) AS n_layers,
        row_number() OVER (ORDER BY max(d_model), max(n_layers), model) AS size_rank
    FROM saes WHERE model IS NOT NULL GROUP BY model;

-- smaller_model() / larger_model(): the default sides a and b of a cross-model query.
CREATE OR REPLACE MACRO smaller_model() AS (SELECT model FROM model_order() ORDER BY size_rank LIMIT 1);
CREATE OR REPLACE MACRO larger_model() AS (SELECT model FROM model_order() ORDER BY size_rank DESC LIMIT 1);
CREATE OR REPLACE MACRO models_listed() AS (SELECT string_agg(model, ', ' ORDER BY size_rank) FROM model_order());

-- check_models(a, b): a one-line error unless a and b are two different models of the run.
CREATE OR REPLACE MACRO check_models(a, b) AS CASE
    WHEN (SELECT count(*) FROM model_order()) < 2
        THEN error('comparing models needs SAEs of two models; this run has only ' || coalesce(models_listed(), 'none'))
    WHEN a NOT IN (SELECT model FROM model_order())
        THEN error('model ' || a || ' (a) has no SAEs in this run; it has: ' || models_listed())
    WHEN b NOT IN (SELECT model FROM model_order())
        THEN error('model ' || b || ' (b) has no SAEs in this run; it has: ' || models_listed())
    WHEN a = b THEN error('a and b are both ' || a || '; give two of: ' || models_listed())
    ELSE true END;

-- seed_stats(min_pos, max_pos, ce_unit): R² and CE_rec per (model, hook, k, expansion, train_tokens, seed):
-- SAEs sharing all of these (an lr sweep's twins) are averaged into one, so a seed is one repeat.
CREATE OR REPLACE MACRO seed_stats(min_pos, max_pos, ce_unit) AS TABLE
    SELECT s.model, s.hook, s.k, s.expansion, s.train_tokens, s.seed, avg(t.r2) AS r2,
        avg(CASE ce_unit WHEN 'seq' THEN t.ce_rec_seq ELSE t.ce_rec END) AS ce_rec, count(*) AS n_saes
    FROM sae_stats(min_pos, max_pos, 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    WHERE t.b = -1
    GROUP BY ALL;

-- model_hooks(): every (model, hook) with SAEs, and its relative depth layer / n_layers.
CREATE OR REPLACE MACRO model_hooks() AS TABLE
    SELECT DISTINCT model, hook, layer, coalesce(depth, layer / n_layers) AS depth
    FROM saes WHERE model IS NOT NULL;

-- depth_pairs(a, b, tol, layers): each hook of model a with the hook of model b at the same relative depth
-- (|depth_a − depth_b| ≤ tol), or, when `layers` is given ('1:4,3:12' = a's layer 1 with b's layer 4, …),
-- with the layers it names. Study 000's pairs (70M layers 1, 3, 5 of 6; 410M layers 4, 12, 20 of 24) are
-- exactly equal in depth.
CREATE OR REPLACE MACRO depth_pairs(a, b, tol, layers) AS TABLE
    WITH mapping AS (
        SELECT string_split(m, ':')[1]::INTEGER AS layer_a, string_split(m, ':')[2]::INTEGER AS layer_b
        FROM (SELECT unnest(string_split(layers, ',')) AS m) WHERE layers IS NOT NULL
    )
    SELECT x.hook AS hook_a, y.hook AS hook_b, x.layer AS layer_a, y.layer AS layer_b,
        x.depth AS depth_a, y.depth AS depth_b, x.depth AS depth
    FROM model_hooks() AS x JOIN model_hooks() AS y ON x.model = a AND y.model = b
    WHERE CASE WHEN layers IS NULL THEN abs(x.depth - y.depth) <= tol
               ELSE (x.layer, y.layer) IN (SELECT (layer_a, layer_b) FROM mapping) END;

-- check_depth_pairs(a, b, tol, layers, at_depth): a one-line error when the tolerance matches one hook to two
-- layers of the other model, when nothing pairs at all, or when a depth was asked for and no pair lies there.
CREATE OR REPLACE MACRO check_depth_pairs(a, b, tol, layers, at_depth) AS CASE
    WHEN (SELECT max(n) FROM (SELECT count(*) AS n FROM depth_pairs(a, b, tol, layers) GROUP BY hook_a)) > 1
        THEN error('depth_tol ' || tol::DOUBLE || ' matches ' || (
            SELECT string_agg(DISTINCT hook_b, ' and ' ORDER BY hook_b) FROM depth_pairs(a, b, tol, layers)
            WHERE hook_a = (SELECT hook_a FROM depth_pairs(a, b, tol, layers) GROUP BY hook_a HAVING count(*) > 1 LIMIT 1))
            || ' of ' || b || ' to one hook of ' || a || '; lower depth_tol or give layers=LA:LB,…')
    WHEN (SELECT max(n) FROM (SELECT count(*) AS n FROM depth_pairs(a, b, tol, layers) GROUP BY hook_b)) > 1
        THEN error('depth_tol ' || tol::DOUBLE || ' matches two hooks of ' || a || ' to one hook of ' || b
                   || '; lower depth_tol or give layers=LA:LB,…')
    WHEN NOT EXISTS (SELECT 1 FROM depth_pairs(a, b, tol, layers))
        THEN error('no hook of ' || a || ' pairs with one of ' || b || CASE WHEN layers IS NULL THEN ' at the same depth (within '
                   || tol::DOUBLE || ')' ELSE ' by layers=' || layers END || '; depths of ' || a || ': '
                   || coalesce((SELECT string_agg(DISTINCT round(depth, 4)::VARCHAR, ', ' ORDER BY round(depth, 4)::VARCHAR) FROM model_hooks() WHERE model = a), 'none')
                   || '; of ' || b || ': '
                   || coalesce((SELECT string_agg(DISTINCT round(depth, 4)::VARCHAR, ', ' ORDER BY round(depth, 4)::VARCHAR) FROM model_hooks() WHERE model = b), 'none')
                   || ' (layer / n_layers); give layers=LA:LB,… to pair them by hand')
    WHEN at_depth IS NOT NULL AND NOT EXISTS (SELECT 1 FROM depth_pairs(a, b, tol, layers) WHERE abs(depth - at_depth) <= tol)
        THEN error('no pair of ' || a || ' and ' || b || ' at depth ' || at_depth::DOUBLE || '; the matched depths are: '
                   || coalesce((SELECT string_agg(DISTINCT round(depth, 4)::VARCHAR, ', ' ORDER BY round(depth, 4)::VARCHAR) FROM depth_pairs(a, b, tol, layers)), 'none')
                   || ' (depths of ' || a || ': ' || (SELECT string_agg(DISTINCT round(depth, 4)::VARCHAR, ', ' ORDER BY round(depth, 4)::VARCHAR) FROM model_hooks() WHERE model = a)
                   || '; of ' || b || ': ' || (SELECT string_agg(DISTINCT round(depth, 4)::VARCHAR, ', ' ORDER BY round(depth, 4)::VARCHAR) FROM model_hooks() WHERE model = b) || ')')
    ELSE true END;

-- check_ce_unit(u): CE_rec as the pooled ratio of sums ('pooled') or the mean of per-sequence ratios ('seq').
CREATE OR REPLACE MACRO check_ce_unit(u) AS CASE
    WHEN u NOT IN ('pooled', 'seq') THEN error('ce_unit must be pooled or seq, not ' || u) ELSE true END;

-- t975(df): the 97.5th percentile of Student's t with df degrees of freedom (a 95% CI of a mean of
-- df + 1 repeats is mean ± t975(df)·sd/√n); NULL for df < 1.
CREATE OR REPLACE MACRO t975(df) AS CASE
    WHEN df < 1 THEN NULL
    WHEN df <= 30 THEN [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
                        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
                        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423][df::INTEGER]
    WHEN df <= 60 THEN 2.0003 + (2.0423 - 2.0003) * (60 - df) / 30
    WHEN df <= 120 THEN 1.9799 + (2.0003 - 1.9799) * (120 - df) / 60
    ELSE 1.9600 END;
