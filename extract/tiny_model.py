"""Build the embedded offline default: corpus, tokenizer and a tiny Gemma-2 model.

No machine here reaches the Hugging Face hub, so tests and the demo need a model and a corpus
that every machine can make for itself. ``python -m extract.tiny_model --out models/tiny-gemma2``
writes one folder that loads with ``AutoModelForCausalLM.from_pretrained`` /
``AutoTokenizer.from_pretrained`` exactly like a hub model, plus the corpus as a ``.jsonl`` file
that goes through the same ``datasets`` path as a user's local json files:

* ``stdlib_docstrings.jsonl`` - docstrings of a fixed, sorted list of standard-library modules,
  read with ``ast`` (nothing is imported, so no module side effects), one docstring per row.
* a byte-level BPE tokenizer trained with ``tokenizers`` that prepends ``<bos>`` like Gemma.
* ``Gemma2ForCausalLM`` with a few small layers, trained briefly on the corpus so that its
  activations have real structure (a random model's residual stream is nearly isotropic).

Everything is seeded and uses deterministic torch algorithms: a rebuild on the same machine and
Python version gives the same files. Other Python versions have other docstrings, hence another
corpus; ``build_info.json`` records the corpus hash and the versions used.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

DEFAULT_OUT = Path("models/tiny-gemma2")
CORPUS_FILE = "stdlib_docstrings.jsonl"
BUILD_INFO = "build_info.json"
PARTIAL_MARK = ".tiny_model_build"  # in <out>.partial while a build writes it
# Gemma's special-token ids, so code that special-cases them behaves as on the real model.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")

# Pure-Python standard-library modules and packages present in Python 3.11-3.13 (a missing one
# is skipped, so a newer Python still builds). Sorted: the corpus order is the row order.
STDLIB_MODULES = (
    "_pydecimal",
    "_pyio",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "collections",
    "concurrent",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "dis",
    "doctest",
    "email",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "heapq",
    "hmac",
    "html",
    "http",
    "imaplib",
    "importlib",
    "inspect",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "weakref",
    "xml",
    "zipfile",
    "zoneinfo",
)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Every setting that determines the built folder; recorded in ``build_info.json``."""

    vocab_size: int = 4096
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    # Smaller than the extraction context, so the sliding/global alternation of Gemma-2 matters.
    sliding_window: int = 64
    train_steps: int = 300
    train_batch: int = 8
    train_ctx: int = 128
    learning_rate: float = 3e-3
    seed: int = 0
    max_corpus_chars: int = 3_000_000


def stdlib_docstrings(
    modules: Sequence[str] = STDLIB_MODULES, max_chars: int | None = None
) -> list[str]:
    """Docstrings of the given modules (module, class, function) in a deterministic order.

    Sources are parsed, not imported. Packages contribute all their ``.py`` files, sorted.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    n_chars = 0
    for name in modules:
        package, module = root / name, root / f"{name}.py"
        files = sorted(package.rglob("*.py")) if package.is_dir() else [module]
        for file in files:
            if not file.is_file():
                continue
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue  # test data files in some packages are deliberately broken
            for node in ast.walk(tree):
                if not isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    continue
                doc = ast.get_docstring(node)
                if not doc or not doc.strip():
                    continue
                if max_chars is not None and n_chars + len(doc) > max_chars:
                    return texts
                texts.append(doc)
                n_chars += len(doc)
    return texts


def write_corpus(texts: Sequence[str], path: Path) -> str:
    """Write one ``{"text": ...}`` row per text; returns the file's sha256."""
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown characters) with Gemma's special tokens and BOS prepending."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",  # as Gemma's tokenizer: the extractor must not rely on the default
        model_max_length=8192,  # Gemma-2's context length
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids, as Gemma
    )


def make_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        query_pre_attn_scalar=spec.head_dim,
        sliding_window=spec.sliding_window,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attn_implementation="eager",  # Gemma-2's attention logit soft-capping needs eager
    )


def _packed_windows(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, ctx: int
) -> torch.Tensor:
    """All texts as ``<bos> text <eos>``, concatenated and cut into ``[n, ctx]`` windows."""
    ids = tokenizer(list(texts), verbose=False)["input_ids"]  # no length warning: we cut
    stream = torch.tensor([t for row in ids for t in (*row, tokenizer.eos_token_id)])
    n = len(stream) // ctx
    return stream[: n * ctx].view(n, ctx)


def _batches(windows: torch.Tensor, spec: TinyModelSpec) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.train_steps):
        yield windows[torch.randint(len(windows), (spec.train_batch,), generator=generator)]


def train_model(
    model: Gemma2ForCausalLM, windows: torch.Tensor, spec: TinyModelSpec, progress: bool = True
) -> dict:
    """Next-token training with AdamW, linear warm-up and cosine decay; returns loss summary."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.train_steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.train_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    bar = tqdm(_batches(windows, spec), total=spec.train_steps, desc="train tiny model",
               disable=not progress)  # fmt: skip
    for batch in bar:
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"initial_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def _versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _read_build_info(path: Path) -> dict | None:
    try:
        return json.loads((path / BUILD_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_tiny_model(
    out: str | Path = DEFAULT_OUT, spec: TinyModelSpec | None = None, progress: bool = True
) -> Path:
    """Build (or reuse) the tiny model folder ``out``; returns its path.

    A folder already built with the same spec is reused. The build goes to ``<out>.partial`` and
    is renamed when complete, so a killed build never leaves a folder that looks finished.
    """
    spec = spec or TinyModelSpec()
    out = Path(out)
    info = _read_build_info(out)
    if info is not None and info.get("spec") == dataclasses.asdict(spec):
        return out
    if out.exists():
        raise FileExistsError(
            f"{out} exists but was not built with these settings; delete it or pass --force"
        )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        if not (partial / PARTIAL_MARK).is_file():
            raise FileExistsError(
                f"{partial} exists and was not left by a tiny-model build; move it away"
            )
        shutil.rmtree(partial)  # left by a killed build of ours
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARK).touch()
    started = time.perf_counter()

    texts = stdlib_docstrings(max_chars=spec.max_corpus_chars)
    corpus_sha256 = write_corpus(texts, partial / CORPUS_FILE)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    windows = _packed_windows(texts, tokenizer, spec.train_ctx)

    # One thread: the same weights on every machine (a reduction split over N threads rounds
    # differently), and at this size threads cost more than they gain (10x on a busy CPU).
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = Gemma2ForCausalLM(make_config(spec, tokenizer))
            losses = train_model(model, windows, spec, progress)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)

    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    build_info = {
        "generated_by": "python -m extract.tiny_model",
        "spec": dataclasses.asdict(spec),
        "corpus": {
            "file": CORPUS_FILE,
            "sha256": corpus_sha256,
            "n_texts": len(texts),
            "n_chars": sum(map(len, texts)),
            "n_train_tokens": int(windows.numel()),
        },
        **losses,
        "build_seconds": round(time.perf_counter() - started, 1),
        "versions": _versions(),
    }
    (partial / BUILD_INFO).write_text(json.dumps(build_info, indent=1) + "\n")
    (partial / PARTIAL_MARK).unlink()
    partial.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    defaults = TinyModelSpec()
    parser = argparse.ArgumentParser(
        prog="python -m extract.tiny_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to create")
    parser.add_argument("--steps", type=int, default=defaults.train_steps, help="training steps")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(defaults, train_steps=args.steps, seed=args.seed)
    if args.force and args.out.exists():
        if _read_build_info(args.out) is None:
            print(
                f"error: {args.out} is not a tiny model folder (no {BUILD_INFO}); --force "
                "replaces only a tiny model built here - choose another --out",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(args.out)
    try:
        path = build_tiny_model(args.out, spec, progress=not args.quiet)
    except OSError as e:  # an existing folder built otherwise, or a disk problem
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = _read_build_info(path)
    assert info is not None  # build_tiny_model returns only a folder holding its build info
    print(
        f"tiny model in {path}: loss {info['initial_loss']:.2f} -> {info['final_loss']:.2f}, "
        f"corpus {path / CORPUS_FILE} ({info['corpus']['n_texts']} texts)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
