"""SAEBench evaluation of exported SAEs. Runs only inside `.venv-eval` (sae-bench pins numpy<2,
which the JAX environment cannot have); talks to the rest of the project through files."""
