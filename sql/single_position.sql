-- single_position: study 001's single-token experiment: the SAE's x̂ (or a baseline) patched at position P
--   alone, KL read at P and the `after` positions that follow, beside the every-position evaluation's KL
--   at the same positions. Does the SAE's gap survive without compounding errors at other positions?
-- Reads: tokens (every-position evaluations), tokens_single (eval --patch-pos P), saes.
-- offset = pos − P (0: the patched token itself). gap = mean KL under the SAE / mean KL under the baseline,
--   over the sequences; gap_all is the same ratio at those positions when every position was patched
--   (NULL when the run has no every-position evaluation of the SAE on that store).
SET VARIABLE after = coalesce(getvariable('after'), 16);  -- positions after P shown (001 used 16)

WITH single AS (
    SELECT sae_id, store, seq, pos, patch_pos, pos - patch_pos AS "offset", kl_patched, baseline, kl_base
    FROM (
        UNPIVOT (SELECT sae_id, store, seq, pos, patch_pos, kl_patched,
                     COLUMNS(lambda c: starts_with(c, 'kl_') AND c NOT IN ('kl_patched', 'kl_zero'))
                 FROM tokens_single WHERE kl_patched IS NOT NULL
                     AND pos BETWEEN patch_pos AND patch_pos + getvariable('after'))
        ON COLUMNS(lambda c: starts_with(c, 'kl_') AND c NOT IN ('kl_patched', 'kl_zero'))
        INTO NAME baseline VALUE kl_base
    )
),
everywhere AS (
    SELECT sae_id, store, seq, pos, kl_patched, replace(baseline, 'kl_', '') AS baseline, kl_base
    FROM (
        UNPIVOT (SELECT sae_id, store, seq, pos, kl_patched,
                     COLUMNS(lambda c: starts_with(c, 'kl_') AND c NOT IN ('kl_patched', 'kl_zero'))
                 FROM tokens WHERE kl_patched IS NOT NULL)
        ON COLUMNS(lambda c: starts_with(c, 'kl_') AND c NOT IN ('kl_patched', 'kl_zero'))
        INTO NAME baseline VALUE kl_base
    )
)
SELECT s.sae_id, s.model, s.layer, s.hook, s.k, g.patch_pos, g."offset", replace(g.baseline, 'kl_', '') AS baseline,
    avg(g.kl_patched) AS kl_sae, avg(g.kl_base) AS kl_baseline, avg(g.kl_patched) / avg(g.kl_base) AS gap,
    avg(a.kl_patched) AS kl_sae_all, avg(a.kl_patched) / avg(a.kl_base) AS gap_all,
    count(*) AS n_seqs
FROM single AS g
JOIN saes AS s USING (sae_id)
LEFT JOIN everywhere AS a
    ON a.sae_id = g.sae_id AND a.store = g.store AND a.seq = g.seq AND a.pos = g.pos
    AND a.baseline = replace(g.baseline, 'kl_', '')
GROUP BY ALL
ORDER BY s.model, s.layer, s.hook, s.k, g.patch_pos, baseline, g."offset";
