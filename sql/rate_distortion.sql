-- rate_distortion: per SAE, the rate proxy (bits/token) against the two distortions, 1 − R² and 1 − CE_rec.
-- Reads: tokens, saes.
-- Rate: Σ over active latents of −log₂ p_i plus 8 bits per value (docs/METHODS.md). A sweep traces a curve
--   per hook; an SAE up and to the right of its neighbours is dominated.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

SELECT s.sae_id, s.model, s.layer, s.hook, s.k, s.d_sae, s.train_tokens, s.seed,
    t.rate_bits, t.l0, 1 - t.r2 AS fvu, 1 - t.ce_rec AS ce_gap
FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
JOIN saes AS s USING (sae_id)
WHERE t.b = -1
ORDER BY s.model, s.layer, s.hook, t.rate_bits;
