-- kl_gap_tokens: the tokens at the patched position with the largest mean KL gap, per hook and baseline.
-- Reads: tokens, saes, vocab (the token's text, written by eval).
-- gap = mean kl_sae / mean kl_baseline over that token's occurrences (pooling the hook's SAEs); tokens
--   seen fewer than min_count times are skipped, so the list is not rare-token noise.
SET VARIABLE min_count = coalesce(getvariable('min_count'), 20);  -- fewest occurrences counted
SET VARIABLE top = coalesce(getvariable('top'), 10);              -- rows per hook and baseline
SET VARIABLE baseline = coalesce(getvariable('baseline'), 'eps'); -- a baseline of kl_gap (eps, samecos, actdiff)
SET VARIABLE min_pos = coalesce(getvariable('min_pos'), 0);       -- first position counted

WITH long AS (FROM baseline_kl() WHERE pos >= getvariable('min_pos')),
per_token AS (
    SELECT s.model, s.hook, l.baseline, l.token, count(*) AS n,
        avg(l.kl_patched) AS kl_sae, avg(l.kl_base) AS kl_baseline, avg(l.kl_patched) / avg(l.kl_base) AS gap
    FROM long AS l
    JOIN saes AS s USING (sae_id)
    WHERE l.baseline = getvariable('baseline')
    GROUP BY ALL
    HAVING count(*) >= getvariable('min_count')
)
SELECT p.model, p.hook, p.baseline, p.token, v.text, p.n, p.kl_sae, p.kl_baseline, p.gap
FROM per_token AS p
LEFT JOIN vocab AS v ON v.model = p.model AND v.token = p.token
QUALIFY row_number() OVER (PARTITION BY p.model, p.hook, p.baseline ORDER BY p.gap DESC) <= getvariable('top')
ORDER BY p.model, p.hook, p.baseline, p.gap DESC;
