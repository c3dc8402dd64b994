-- darkmatter_patch: how much of the SAE's CE gap patching x̂ + LinearError or x̂ + NonlinearError closes.
-- Reads: tokens, saes (after `actstore darkmatter RUN` and `actstore eval … --darkmatter`).
-- closed_* = (L_sae − L_setting)/(L_sae − L_orig) with L the mean CE (METHODS.md): 1 means adding that
--   part of the error back restores the clean loss; near 0, that part does not matter for behaviour.
--   Odd sequences only: the probes were fitted on the even ones.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);  -- first position counted

SELECT s.model, s.layer, s.hook, s.k,
    avg(t.ce_orig) AS ce_orig, avg(t.ce_patched) AS ce_sae, avg(t.ce_linear) AS ce_linear,
    avg(t.ce_nonlinear) AS ce_nonlinear,
    (avg(t.ce_patched) - avg(t.ce_linear)) / (avg(t.ce_patched) - avg(t.ce_orig)) AS closed_linear,
    (avg(t.ce_patched) - avg(t.ce_nonlinear)) / (avg(t.ce_patched) - avg(t.ce_orig)) AS closed_nonlinear,
    avg(t.kl_linear) AS kl_linear, avg(t.kl_nonlinear) AS kl_nonlinear, s.sae_id
FROM tokens AS t
JOIN saes AS s USING (sae_id)
WHERE t.pos >= getvariable('min_pos') AND t.ce_orig IS NOT NULL
    AND t.seq % 2 = 1  -- held out: the probes were fitted on even sequences
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, s.k;
