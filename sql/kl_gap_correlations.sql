-- kl_gap_correlations: what goes with a token's KL gap? Other SAEs' gaps (other layers), cos, L0, token frequency.
-- Reads: tokens, saes.
-- Study 001: the per-token gap = kl_sae − kl_baseline (a difference). Per SAE, Pearson correlations of it
--   over the selected tokens: against = 'sae' with another SAE's gap on the same tokens (other_sae; 001
--   found these the strongest), 'cos' and 'l0' with the SAE's own per-token cos and L0, and 'frequency'
--   across token ids: each id's mean gap against its count among the selected tokens (ids seen ≥
--   min_count times; 001 found ≈ 0). n = tokens (or token ids) in the correlation.
SET VARIABLE baseline = coalesce(getvariable('baseline'), 'eps');  -- the baseline of the gap (eps, samecos, …)
SET VARIABLE min_count = coalesce(getvariable('min_count'), 5);    -- fewest occurrences of a token id (frequency)
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);        -- first position counted
SET VARIABLE max_pos = coalesce(getvariable('max_pos'), 1000000);  -- last position counted

WITH g AS (
    SELECT b.sae_id, b.seq, b.pos, b.token, b.kl_patched - b.kl_base AS gap, t.store, t.cos, t.l0
    FROM baseline_kl() AS b
    JOIN tokens AS t USING (sae_id, seq, pos)
    WHERE b.baseline = getvariable('baseline') AND b.pos BETWEEN getvariable('min_pos') AND getvariable('max_pos')
),
pairs AS (
    SELECT i.sae_id, 'sae' AS against, j.sae_id AS other_sae, corr(i.gap, j.gap) AS corr, count(*) AS n
    FROM g AS i JOIN g AS j ON j.store = i.store AND j.seq = i.seq AND j.pos = i.pos AND j.sae_id <> i.sae_id
    GROUP BY ALL
),
own AS (
    SELECT sae_id, 'cos' AS against, NULL::VARCHAR AS other_sae, corr(gap, cos) AS corr, count(*) AS n FROM g GROUP BY ALL
    UNION ALL
    SELECT sae_id, 'l0', NULL, corr(gap, l0), count(*) FROM g GROUP BY ALL
),
per_token AS (
    SELECT sae_id, token, avg(gap) AS gap, count(*) AS freq FROM g GROUP BY ALL HAVING count(*) >= getvariable('min_count')
),
frequency AS (
    SELECT sae_id, 'frequency' AS against, NULL::VARCHAR AS other_sae, corr(gap, freq) AS corr, count(*) AS n
    FROM per_token GROUP BY ALL
)
SELECT s.model, s.layer, s.hook, s.k, c.sae_id, getvariable('baseline') AS baseline, c.against, o.layer AS other_layer,
    o.k AS other_k, c.corr, c.n, c.other_sae
FROM (FROM pairs UNION ALL BY NAME FROM own UNION ALL BY NAME FROM frequency) AS c
JOIN saes AS s USING (sae_id)
LEFT JOIN saes AS o ON o.sae_id = c.other_sae
ORDER BY s.model, s.layer, s.hook, s.k, c.sae_id, c.against, o.layer, o.k, c.other_sae;
