"""Stage 1 of the pipeline: cache a causal LM's residual-stream activations.

``python -m extract`` is the command line (``extract.cli``); ``extract.extractor`` does the work;
``extract.sources`` loads models and text from local paths or the hub; ``extract.tiny_model``
builds the embedded offline default model and corpus.
"""
