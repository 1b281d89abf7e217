"""Trained runs in the formats other tools load: SAELens folders and SAEBench torch modules.

Needs only numpy, safetensors and torch, never JAX, so the evaluation environment imports it."""
