"""jax-sae-lab: sparse autoencoders on LLM activations in JAX.

Entry points: `jax_sae.variants.make_variant` (SAE variants and their losses),
`jax_sae.optim.make_optimizer` and `jax_sae.train_step.make_train_step`.

This package file imports nothing on purpose: `jax_sae.data` must stay importable without JAX.
"""
