"""Synthetic worlds with known features (built on SAELens's `sae_lens.synthetic`) and their scoring.

`synth.make_world` writes a world as an ordinary activation cache plus its ground truth;
`synth.evaluate` scores a trained run against it; `synth.metrics` holds the pure metric functions.
"""

WORLDS = ("basic", "hierarchy", "temporal", "zipf")
