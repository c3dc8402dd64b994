-- darkmatter: how much of each SAE's error a linear map of x predicts (Engels et al.; `actstore darkmatter`).
-- Reads: darkmatter, saes.
-- vector_r2: held-out R² of the linear error probe x → e (mean over dimensions). fvu = fvu_linear +
--   fvu_nonlinear (004 Fig. 1: fvu_linear = fvu − fvu_nonlinear): the SAE's FVU split into the part a
--   linear probe recovers and the rest. min_pos and split say which tokens fit and scored the probe;
--   probe_form: linear (004 Eq. 10/11, b·x: the default) or affine (`darkmatter --probe affine`).
--   norm_r2_*: held-out R² of predicting ‖e‖², ‖x‖², ‖x̂‖², ‖nonlinear e‖² from x (004's norm prediction test).
-- fvu_pursuit, fvu_nonlinear_pursuit: the same split for gradient pursuit on the SAE's decoder at each token's
--   own L0 (004 §6.1: a better encoder; encoder_share = the share of the FVU pursuit removes, and
--   nonlinear_removed = fvu_nonlinear − fvu_nonlinear_pursuit). prev_*: held-out R² of predicting e,
--   LinearError and NonlinearError from the reconstructions of the SAE one layer below (004 §6.2;
--   `darkmatter --prev-layer`), NULL without it.
SELECT s.model, s.layer, s.hook, s.k, d.vector_r2, d.fvu, d.fvu_linear, d.fvu_nonlinear,
    d.norm_r2_err, d.norm_r2_x, d.norm_r2_recon, d.norm_r2_nonlinear,
    d.fvu_pursuit, d.fvu_nonlinear_pursuit, 1 - d.fvu_pursuit / d.fvu AS encoder_share,
    d.fvu_nonlinear - d.fvu_nonlinear_pursuit AS nonlinear_removed,
    d.prev_sae_id, d.prev_r2_err, d.prev_r2_linear, d.prev_r2_nonlinear,
    d.n_fit, d.n_test, d.min_pos, d.split, d.probe_form, d.sae_id
FROM darkmatter AS d
JOIN saes AS s USING (sae_id)
ORDER BY s.model, s.layer, s.hook, s.k;
