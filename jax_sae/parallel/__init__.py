"""Devices and hosts: the jax.sharding mesh layout and jax.distributed start-up."""
