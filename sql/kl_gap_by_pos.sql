-- kl_gap_by_pos: the KL gap (SAE over baseline) by position in the sequence, per hook, pooling its SAEs.
-- Reads: tokens, saes.
-- Positions are grouped in buckets of `bucket`; gap = Σ kl_sae / Σ kl_baseline within the bucket. Early
--   positions (few tokens of context) often behave differently: this shows whether a position filter
--   matters for the headline gap.
SET VARIABLE bucket = coalesce(getvariable('bucket'), 16);  -- positions per row
SET VARIABLE k = coalesce(getvariable('k'), NULL);          -- only SAEs with this k (NULL: all)

WITH long AS (FROM baseline_kl())
SELECT s.model, s.layer, s.hook, l.baseline,
    (l.pos // getvariable('bucket')) * getvariable('bucket') AS pos_from,
    (l.pos // getvariable('bucket')) * getvariable('bucket') + getvariable('bucket') - 1 AS pos_to,
    sum(l.kl_patched) / sum(l.kl_base) AS gap, avg(l.kl_patched) AS kl_sae, avg(l.kl_base) AS kl_baseline,
    count(*) AS n_tokens
FROM long AS l
JOIN saes AS s USING (sae_id)
WHERE getvariable('k') IS NULL OR s.k = getvariable('k')
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, l.baseline, pos_from;
