-- layers: the participation ratio of every harvested hook, raw and with the top direction removed.
-- Reads: layers.
-- PR = (Σλ)²/Σλ² of the mean-centred covariance's eigenvalues: the effective number of directions
--   used. A dip in the deflated PR across depth is the "canyon"; harvest every resid_post to see it.
SELECT model, layer, hook, d_model, n_tokens, pr, pr_deflated, variance, top_share, store
FROM layers
ORDER BY model, store, layer, hook;
