"""The SAEs: architectures, activation functions, sparse paths, loss terms, variants."""
