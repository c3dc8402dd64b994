-- curves: the training curves, one row per logged step of every SAE (what the report plots).
-- Reads: curves, saes.
-- mse, nmse, explained_variance, l0, dead_frac (latents silent for the dead window), batch_usage (share
--   of latents firing in the batch), lr, aux_loss; `every` thins the rows for plotting.
SET VARIABLE every = coalesce(getvariable('every'), 1);  -- keep every n-th logged step

SELECT c.sae_id, s.layer, s.hook, s.k, c.* EXCLUDE (sae_id)
FROM curves AS c
LEFT JOIN saes AS s USING (sae_id)
QUALIFY (row_number() OVER (PARTITION BY c.sae_id ORDER BY c.step) - 1) % getvariable('every') = 0
ORDER BY s.layer, s.hook, s.k, c.sae_id, c.step;
