"""Session-wide fixtures: the embedded tiny model, its corpus, and a small activation cache.

Everything is built once per test session in a temporary folder (never the repo's
``models/tiny-gemma2``), from the same builder as ``make tiny-model`` with a shorter training run
and a smaller corpus so the session pays only a few seconds for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run tiny models, where OpenMP threads cost more than they gain, and on a busy 2-core
# machine idle OpenMP workers spin on cores other processes need (torch forwards ran 10x slower).
# Set before torch is imported; subprocesses (the kill/resume test) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """In CI the SAEBench tests must run: a missing `.venv-eval` is an error there, not a skip."""
    eval_python = Path(__file__).resolve().parents[1] / ".venv-eval" / "bin" / "python"
    if os.environ.get("CI") and not eval_python.exists():
        raise pytest.UsageError(".venv-eval is missing in CI; `make test` creates it (setup-eval)")


# The build recipe of the test model: the default architecture, trained briefly on a corpus prefix.
TINY_TEST_SPEC = {"train_steps": 20, "train_batch": 4, "max_corpus_chars": 200_000}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``."""
    from extract.tiny_model import TinyModelSpec, build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-gemma2"
    return build_tiny_model(out, TinyModelSpec(**TINY_TEST_SPEC), progress=False)


@pytest.fixture(scope="session")
def tiny_corpus(tiny_model_dir: Path) -> Path:
    """The stdlib-docstring corpus as a local ``.jsonl`` file with a ``text`` field."""
    from extract.tiny_model import CORPUS_FILE

    return tiny_model_dir / CORPUS_FILE


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_corpus: Path):
    """A complete bfloat16 cache of layers 1 and 2 of the tiny model (d_model 64, ~8k tokens,
    several shards). Read-only: copy it before damaging it."""
    from extract.extractor import ExtractConfig, extract

    cfg = ExtractConfig(
        model=str(tiny_model_dir),
        dataset=(str(tiny_corpus),),
        layers=(1, 2),
        tokens=8000,
        ctx_len=64,
        batch_size=16,
        shard_tokens=2000,
        out=tmp_path_factory.mktemp("caches") / "tiny",
        progress=False,
    )
    return extract(cfg)
