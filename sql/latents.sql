-- latents: every latent's firing rate on the eval tokens, its rank, and its decoder row norm, per SAE.
-- Reads: latents, saes.
-- rank 1 is the most frequent latent; never-fired latents (firing_rate = 0) sit at the floor. A healthy
--   TopK SAE has a smooth log-log rank curve with few dead latents; decoder norms are 1 by construction
--   in ours (unit-norm rows), and tell how other SAEs scale their latents.
SELECT l.sae_id, s.layer, s.hook, s.k, l.latent, l.fires, l.firing_rate, l.dec_norm,
    row_number() OVER (PARTITION BY l.sae_id ORDER BY l.firing_rate DESC, l.latent) AS rank
FROM latents AS l
JOIN saes AS s USING (sae_id)
ORDER BY s.layer, s.hook, s.k, l.sae_id, rank;
