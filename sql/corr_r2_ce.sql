-- corr_r2_ce: per model and depth, does a higher R² go with a higher CE_rec across the sweep?
-- Reads: tokens, saes.
-- pooled: Pearson correlation of the SAEs' R² and CE_rec. within_k: the same after subtracting each k's
--   mean from both (docs/METHODS.md), so the trend that k drives both is taken out; NULL with one SAE per k.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH stats AS (
    SELECT s.model, s.layer, s.hook, s.k, t.r2, t.ce_rec
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    WHERE t.b = -1
),
centred AS (
    SELECT *, r2 - avg(r2) OVER (PARTITION BY model, hook, k) AS r2_c,
        ce_rec - avg(ce_rec) OVER (PARTITION BY model, hook, k) AS ce_rec_c
    FROM stats
)
SELECT model, layer, hook, count(*) AS n_saes, count(DISTINCT k) AS n_k,
    corr(r2, ce_rec) AS pooled,
    CASE WHEN count(*) > count(DISTINCT k) THEN corr(r2_c, ce_rec_c) END AS within_k
FROM centred
GROUP BY ALL
ORDER BY model, layer, hook;
