-- darkmatter_patch: how much of the SAE's CE gap patching x̂ + LinearError or x̂ + NonlinearError closes.
-- Reads: tokens, darkmatter_tokens, saes (after `actstore eval` and `actstore darkmatter RUN`).
-- closed_* = (L_sae − L_setting)/(L_sae − L_orig) with L the mean CE (docs/METHODS.md): 1 means adding that
--   part of the error back restores the clean loss; near 0, that part does not matter for behaviour.
--   darkmatter_tokens holds the held-out (odd) sequences only: the probes were fitted on the even ones.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);  -- first position counted

SELECT s.model, s.layer, s.hook, s.k,
    avg(t.ce_orig) AS ce_orig, avg(t.ce_patched) AS ce_sae, avg(d.ce_linear) AS ce_linear,
    avg(d.ce_nonlinear) AS ce_nonlinear,
    (avg(t.ce_patched) - avg(d.ce_linear)) / (avg(t.ce_patched) - avg(t.ce_orig)) AS closed_linear,
    (avg(t.ce_patched) - avg(d.ce_nonlinear)) / (avg(t.ce_patched) - avg(t.ce_orig)) AS closed_nonlinear,
    avg(d.kl_linear) AS kl_linear, avg(d.kl_nonlinear) AS kl_nonlinear, s.sae_id
FROM darkmatter_tokens AS d
JOIN tokens AS t USING (sae_id, store, seq, pos)
JOIN saes AS s USING (sae_id)
WHERE t.pos >= getvariable('min_pos') AND t.ce_orig IS NOT NULL
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, s.k;
