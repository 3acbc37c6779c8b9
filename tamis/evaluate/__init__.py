"""`tamis evaluate`: the survey's third stage, runnable. Select with each recipe, fine-tune the PFM on
each selection (SEM), on the whole pool (BM) and on a random subset of the same size (the control),
with identical settings; score them on an evaluation set (held-out answer loss, pairwise wins judged
in both orders); report PIR and SDF per seed and place the method on the efficiency graph.

Modules: `pairwise` (verdicts, wins-ties-losses, wins-rate), `judges` (local or endpoint judges),
`generate` (greedy answers of a trained model), `heldout` (answer loss on reference answers),
`metrics` (PIR per group and seed, SDF, the points file), `run` (the orchestration).
"""
