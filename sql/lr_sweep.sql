-- lr_sweep: which learning rate won in each cell of a sweep, and whether each SAE had converged.
-- Reads: tokens, saes, positions.
-- Per (model, hook, k, expansion, train_tokens, seed) and learning rate: held-out fvu (Σsse/Σsst over the
--   eval tokens, docs/METHODS.md), ce_rec, and train's still_improving / undertrained (the batch FVU was
--   still falling when the rate decayed). best: the rate with the lowest held-out FVU of its cell;
--   best_at_edge: that rate is the smallest or largest tried, so the sweep should be widened.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);  -- first position counted

WITH per_sae AS (  -- fvu = 1 − R², SST centred on the selected positions as in `summary`
    SELECT s.model, s.layer, s.hook, s.k, s.expansion, s.train_tokens, s.seed, s.lr, s.still_improving,
        s.undertrained, 1 - t.r2 AS fvu, t.ce_rec, s.sae_id
    FROM sae_stats(getvariable('min_pos'), 1000000, 0, 0, 0) AS t
    JOIN saes AS s USING (sae_id)
    WHERE t.b = -1 AND s.lr IS NOT NULL
)
SELECT * EXCLUDE (sae_id),
    count(*) OVER cell AS n_lr,
    fvu = min(fvu) OVER cell AS best,
    fvu = min(fvu) OVER cell AND count(*) OVER cell > 1 AND (lr = min(lr) OVER cell OR lr = max(lr) OVER cell)
        AS best_at_edge,
    sae_id
FROM per_sae
WINDOW cell AS (PARTITION BY model, hook, k, expansion, train_tokens, seed)
ORDER BY model, layer, hook, k, expansion, train_tokens, seed, lr;
