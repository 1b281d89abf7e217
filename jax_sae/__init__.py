"""jax-sae-lab: sparse autoencoders on language-model activations, in JAX.

Layers, each importing only those before it (docs/architecture.md):

    util      one-line CLI errors, disk space, atomic files
    parallel  the device mesh layout and multi-host start-up
    data      the activation cache on disk, the file loader, the streaming cache
    model     architectures, activation functions, sparse paths, loss terms, the variant registry
    report    held-out evaluation, run folders, comparisons, plots
    training  the trainer: config, compiled step, optimiser, checkpoints, loop, sweeps
    export    SAELens folders and SAEBench torch modules (numpy + torch only, never JAX)

Entry point: `from jax_sae.training import Trainer, TrainConfig`. This file imports nothing, so
that `jax_sae.data` and `jax_sae.export` stay importable without JAX.
"""
