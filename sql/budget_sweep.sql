-- budget_sweep: the phase-2 table: ΔR² and ΔCE_rec of each token budget against a reference budget, by k.
-- Reads: tokens, saes.
-- Per model, layer, k and budget: the mean over seeds of Δ = X(budget) − X(ref_tokens) at the same seed,
--   and the mismatch rate (share of seeds with ΔR² > 0 and ΔCE_rec < 0). Point estimates; `delta` with
--   compare=train_tokens gives the per-seed CIs.
SET VARIABLE ref_tokens = coalesce(getvariable('ref_tokens'), (SELECT min(train_tokens) FROM saes));  -- reference budget
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH stats AS (
    SELECT s.model, s.layer, s.hook, s.k, s.expansion, s.train_tokens, s.seed, t.r2, t.ce_rec
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    WHERE t.b = -1
),
deltas AS (
    SELECT x.model, x.layer, x.hook, x.k, x.expansion, x.train_tokens, x.seed,
        x.r2 - r.r2 AS d_r2, x.ce_rec - r.ce_rec AS d_ce_rec, x.r2 AS r2, x.ce_rec AS ce_rec
    FROM stats AS x
    JOIN stats AS r USING (model, layer, hook, k, expansion, seed)
    WHERE r.train_tokens = getvariable('ref_tokens') AND x.train_tokens <> getvariable('ref_tokens')
)
SELECT model, layer, hook, k, expansion, getvariable('ref_tokens') AS ref_tokens, train_tokens,
    count(*) AS n_seeds, avg(r2) AS r2, avg(d_r2) AS d_r2, avg(ce_rec) AS ce_rec, avg(d_ce_rec) AS d_ce_rec,
    avg(mismatch(d_r2, d_ce_rec)::INTEGER) AS mismatch_rate
FROM deltas
GROUP BY ALL
ORDER BY model, layer, k, train_tokens;
