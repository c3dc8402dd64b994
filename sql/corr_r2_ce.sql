-- corr_r2_ce: per relative depth, does a higher R² go with a higher CE_rec across the sweep and across models?
-- Reads: tokens, saes, positions.
-- Study 000's table: every SAE of every model at that depth (hooks paired to the smallest model's by
--   depth = layer / n_layers, within depth_tol) is one point. pooled: Pearson correlation of R² and CE_rec
--   over them all (k and scale vary). within_k: the same after subtracting, for each k, the mean over the
--   models (and seeds) at that k from both (docs/METHODS.md), so what k drives is taken out and what scale
--   does remains; n = 2 models × 6 k in study 000. NULL with one SAE per k.
SET VARIABLE depth_tol = coalesce(getvariable('depth_tol'), 0.01);  -- how close two depths must be to pool
SET VARIABLE train_tokens = coalesce(getvariable('train_tokens'), NULL);  -- only SAEs of this token budget (NULL: all)
SET VARIABLE ce_unit = coalesce(getvariable('ce_unit'), 'pooled');  -- CE_rec pooled over tokens, or 'seq': mean of per-sequence CE_rec
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SELECT check_ce_unit(getvariable('ce_unit'));

WITH anchors AS (  -- the smallest model's hooks: the depths points are pooled at
    SELECT hook AS anchor, layer AS anchor_layer, depth FROM model_hooks() WHERE model = smaller_model()
),
grouped AS (  -- each (model, hook) with the anchor depth it sits at
    SELECT h.model, h.hook, a.anchor, a.anchor_layer, a.depth
    FROM model_hooks() AS h JOIN anchors AS a ON abs(h.depth - a.depth) <= getvariable('depth_tol')
),
guard AS (
    SELECT CASE WHEN max(n) > 1 THEN error('depth_tol ' || getvariable('depth_tol')::DOUBLE
        || ' puts two hooks of one model at one depth; lower depth_tol') END AS ok
    FROM (SELECT count(*) AS n FROM grouped GROUP BY model, anchor)
),
stats AS (
    SELECT g.depth, s.model, s.hook, s.k, t.r2,
        CASE getvariable('ce_unit') WHEN 'seq' THEN t.ce_rec_seq ELSE t.ce_rec END AS ce_rec
    FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    JOIN grouped AS g ON g.model = s.model AND g.hook = s.hook
    WHERE t.b = -1 AND (getvariable('train_tokens') IS NULL OR s.train_tokens = getvariable('train_tokens'))
),
centred AS (
    SELECT *, r2 - avg(r2) OVER (PARTITION BY depth, k) AS r2_c,
        ce_rec - avg(ce_rec) OVER (PARTITION BY depth, k) AS ce_rec_c
    FROM stats
)
SELECT depth, string_agg(DISTINCT hook, ', ' ORDER BY hook) AS hooks, count(DISTINCT model) AS n_models,
    count(*) AS n_saes, count(DISTINCT k) AS n_k,
    corr(r2, ce_rec) AS pooled,
    CASE WHEN count(*) > count(DISTINCT k) THEN corr(r2_c, ce_rec_c) END AS within_k
FROM centred, guard
WHERE guard.ok IS NULL
GROUP BY depth
ORDER BY depth;
