-- budget_sweep: study 002's table: per (depth, k, token budget T), Δ = larger − smaller model over repeats.
-- Reads: tokens, saes, positions.
-- Sides and depth pairing as in `delta` (a the smaller model, b the larger; hooks at the same
--   layer / n_layers). A repeat is one seed trained on both sides at that (k, T); SAEs sharing (model, hook,
--   k, expansion, T, seed) are averaged into one repeat first (no pseudo-repeats). Per cell: n = distinct
--   seeds, the mean of ΔCE_rec and ΔR² over them with a 95% t-interval (mean ± t₀.₉₇₅(n−1)·sd/√n; NULL for
--   n = 1), and mismatch_rate = the share of repeats with ΔR² > 0 and ΔCE_rec < 0. `delta` with
--   compare=train_tokens differences budgets within one model instead.
SET VARIABLE a = coalesce(getvariable('a'), NULL);            -- the smaller model (NULL: by d_model, then n_layers)
SET VARIABLE b = coalesce(getvariable('b'), NULL);            -- the larger model (NULL: by d_model, then n_layers)
SET VARIABLE depth = coalesce(getvariable('depth'), NULL);    -- only this relative depth, e.g. 0.5 (NULL: every matched depth)
SET VARIABLE depth_tol = coalesce(getvariable('depth_tol'), 0.01);  -- how close two depths must be to pair
SET VARIABLE layers = coalesce(getvariable('layers'), NULL);  -- explicit pairs 'LA:LB,…' (layer of a : layer of b)
SET VARIABLE ce_unit = coalesce(getvariable('ce_unit'), 'pooled');  -- CE_rec pooled over tokens, or 'seq': mean of per-sequence CE_rec
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SELECT check_ce_unit(getvariable('ce_unit'));
SET VARIABLE a = coalesce(getvariable('a')::VARCHAR, smaller_model());
SET VARIABLE b = coalesce(getvariable('b')::VARCHAR, larger_model());
SELECT check_models(getvariable('a'), getvariable('b'))
    AND check_depth_pairs(getvariable('a'), getvariable('b'), getvariable('depth_tol'), getvariable('layers'),
                          getvariable('depth'));

WITH stats AS (  -- one repeat per (model, hook, k, expansion, budget, seed)
    FROM seed_stats(getvariable('min_pos'), getvariable('max_pos'), getvariable('ce_unit'))
    WHERE model IN (getvariable('a'), getvariable('b'))
),
repeats AS (
    SELECT p.depth, p.layer_a, p.layer_b, x.k, x.expansion, x.train_tokens, x.seed,
        y.r2 - x.r2 AS d_r2, y.ce_rec - x.ce_rec AS d_ce_rec
    FROM depth_pairs(getvariable('a'), getvariable('b'), getvariable('depth_tol'), getvariable('layers')) AS p
    JOIN stats AS x ON x.model = getvariable('a') AND x.hook = p.hook_a
    JOIN stats AS y ON y.model = getvariable('b') AND y.hook = p.hook_b AND y.k = x.k
        AND y.expansion = x.expansion AND y.train_tokens = x.train_tokens AND y.seed = x.seed
    WHERE getvariable('depth') IS NULL OR abs(p.depth - getvariable('depth')) <= getvariable('depth_tol')
),
cells AS (
    SELECT depth, layer_a, layer_b, k, expansion, train_tokens, count(DISTINCT seed) AS n,
        avg(d_ce_rec) AS d_ce_rec, stddev_samp(d_ce_rec) AS sd_ce_rec,
        avg(d_r2) AS d_r2, stddev_samp(d_r2) AS sd_r2,
        avg(mismatch(d_r2, d_ce_rec)::INTEGER) AS mismatch_rate
    FROM repeats
    GROUP BY ALL
)
SELECT getvariable('a') AS a, getvariable('b') AS b, depth, layer_a, layer_b, k, expansion, train_tokens, n,
    d_ce_rec, d_ce_rec - t975(n - 1) * sd_ce_rec / sqrt(n) AS d_ce_rec_lo, d_ce_rec + t975(n - 1) * sd_ce_rec / sqrt(n) AS d_ce_rec_hi,
    d_r2, d_r2 - t975(n - 1) * sd_r2 / sqrt(n) AS d_r2_lo, d_r2 + t975(n - 1) * sd_r2 / sqrt(n) AS d_r2_hi,
    mismatch_rate
FROM cells
ORDER BY depth, k, expansion, train_tokens;
