-- kl_distribution: per SAE and patch, the per-token distribution of KL and of the CE difference, to the 99.9th percentile.
-- Reads: tokens, saes.
-- Study 001 looks past the mean: rare tokens with a huge KL carry much of the damage. For the SAE's x̂
--   (`patched`), zero ablation and every baseline: the mean and the 50/90/99/99.9th percentiles of
--   KL(P ‖ Q) and of ΔCE = ce_<patch> − ce_orig over the selected tokens (NULLs at the last position left
--   out), and the share of tokens whose ΔCE is negative (the patch helped). Percentiles interpolate
--   (quantile_cont); the 99.9th needs ≥ 1,000 tokens to mean anything, so n_tokens is beside it.
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH kl AS (
    UNPIVOT (SELECT sae_id, seq, pos, COLUMNS(lambda c: starts_with(c, 'kl_')) FROM tokens
             WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos'))
    ON COLUMNS(lambda c: starts_with(c, 'kl_')) INTO NAME patch VALUE kl
),
ce AS (
    UNPIVOT (SELECT sae_id, seq, pos, ce_orig, COLUMNS(lambda c: starts_with(c, 'ce_') AND c <> 'ce_orig') FROM tokens
             WHERE pos BETWEEN getvariable('min_pos') AND getvariable('max_pos') AND ce_orig IS NOT NULL)
    ON COLUMNS(lambda c: starts_with(c, 'ce_') AND c <> 'ce_orig') INTO NAME patch VALUE ce
),
joined AS (
    SELECT kl.sae_id, replace(kl.patch, 'kl_', '') AS patch, kl.kl, ce.ce - ce.ce_orig AS d_ce
    FROM kl LEFT JOIN ce ON ce.sae_id = kl.sae_id AND ce.seq = kl.seq AND ce.pos = kl.pos
        AND replace(ce.patch, 'ce_', '') = replace(kl.patch, 'kl_', '')
)
SELECT model, layer, hook, k, sae_id, patch, n_tokens,
    kl_mean, kl_q[1] AS kl_p50, kl_q[2] AS kl_p90, kl_q[3] AS kl_p99, kl_q[4] AS kl_p999,
    d_ce_mean, d_ce_q[1] AS d_ce_p50, d_ce_q[2] AS d_ce_p90, d_ce_q[3] AS d_ce_p99, d_ce_q[4] AS d_ce_p999,
    share_ce_better
FROM (
    SELECT s.model, s.layer, s.hook, s.k, j.sae_id, j.patch, count(*) AS n_tokens,
        avg(j.kl) AS kl_mean, quantile_cont(j.kl, [0.5, 0.9, 0.99, 0.999]) AS kl_q,
        avg(j.d_ce) AS d_ce_mean, quantile_cont(j.d_ce, [0.5, 0.9, 0.99, 0.999]) AS d_ce_q,
        avg((j.d_ce < 0)::INTEGER) AS share_ce_better
    FROM joined AS j
    JOIN saes AS s USING (sae_id)
    GROUP BY ALL
)
ORDER BY model, layer, hook, k, sae_id, patch;
