-- eval_overview: per SAE, the headline numbers of METHODS.md on its eval store, all positions.
--   r2                 1 − Σ sse / Σ sst (sst about the eval-set mean)
--   ce_rec             2 − Σ ce_patched / Σ ce_orig           (the seed research's score)
--   ce_loss_recovered  (Σ ce_zero − Σ ce_patched) / (Σ ce_zero − Σ ce_orig)   (SAELens's score)
--   kl, kl_eps         mean KL(clean ‖ patched) under the SAE and under the ε-random baseline
--   kl_gap_eps         kl / kl_eps: above 1, the SAE's error hurts more than a random one of its size
-- Reads: tokens, saes. Parameters: none. (Sums skip NULLs: the last position has no next token.)
SELECT
    s.sae_id,
    s.hook,
    s.k,
    1 - sum(t.sse) / sum(t.sst)                                              AS r2,
    2 - sum(t.ce_patched) / sum(t.ce_orig)                                   AS ce_rec,
    (sum(t.ce_zero) - sum(t.ce_patched)) / (sum(t.ce_zero) - sum(t.ce_orig)) AS ce_loss_recovered,
    avg(t.kl_patched)                                                        AS kl,
    avg(t.kl_eps)                                                            AS kl_eps,
    avg(t.kl_patched) / avg(t.kl_eps)                                        AS kl_gap_eps
FROM tokens AS t
JOIN saes AS s USING (sae_id)
GROUP BY ALL
ORDER BY s.hook, s.k;
