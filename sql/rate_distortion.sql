-- rate_distortion: per SAE, the rate proxy (bits/token) against the two distortions, 1 − R² and 1 − CE_rec.
-- Reads: tokens, saes.
-- Rate: Σ over active latents of −log₂ p_i plus 8 bits per value (docs/METHODS.md): each index coded on
--   its own, as if their order carried information (coder=sequence). coder=set codes the unordered set of
--   active indices: the same less log₂(l0!) bits per token (≈ 118 bits at l0 = 32). A sweep traces a curve
--   per hook; an SAE up and to the right of its neighbours is dominated.
SET VARIABLE coder = coalesce(getvariable('coder'), 'set');        -- set (the active indices as a set) or sequence
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted
SELECT CASE WHEN getvariable('coder') NOT IN ('set', 'sequence')
            THEN error('coder must be set or sequence, not ' || getvariable('coder')) END;

SELECT s.sae_id, s.model, s.layer, s.hook, s.k, s.d_sae, s.train_tokens, s.seed,
    CASE getvariable('coder') WHEN 'set' THEN t.rate_bits_set ELSE t.rate_bits END AS rate_bits,
    getvariable('coder') AS coder, t.l0, 1 - t.r2 AS fvu, 1 - t.ce_rec AS ce_gap
FROM sae_stats(getvariable('min_pos'), getvariable('max_pos'), 0, 0, 0) AS t
JOIN saes AS s USING (sae_id)
WHERE t.b = -1
ORDER BY s.model, s.layer, s.hook, t.rate_bits;
