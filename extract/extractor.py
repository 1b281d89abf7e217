"""Stage 1: run a causal LM over text and cache its residual stream at chosen layers.

Design:

* **Only the needed blocks run.** The decoder's ``ModuleList`` is truncated to blocks
  ``0..max(layers)`` before the model moves to the device, and the *base* model (no LM head) is
  called. Truncation was chosen over raising an exception from a hook on the last block: the later
  blocks then neither run nor occupy device memory, and no control flow passes through library
  code by exception. Architectures that index blocks by ``config.num_hidden_layers`` would fail
  loudly (``IndexError``) rather than silently run more.
* **All layers in one pass**: forward hooks on the requested blocks keep each block's output, the
  residual stream after block ``L`` (TransformerLens ``blocks.{L}.hook_resid_post``, which equals
  ``hidden_states[L + 1]`` of a full forward for every block but the last, whose entry in
  ``hidden_states`` is after the final norm).
* **Deterministic order, exact resume**: texts are read in dataset order, ``batch_size`` at a time,
  and a shard is cut only at a batch boundary once it holds ``shard_tokens`` tokens. A resumed run
  skips the ``n_sequences`` texts of the complete shards and so forms exactly the batches - hence
  bit-identical activations - of an uninterrupted run. ``n_sequences`` counts texts consumed.
* **Streaming**: with ``disk_budget`` the writer waits before a shard that would not fit and
  deletes shards the trainer released (``jax_sae.data.stream``); the model then waits with it.
  Deleted shards stay listed, so resume skips their texts like any other shard's.
* **Overlap**: tokenisation runs one batch ahead on a thread; device-to-host copies are
  asynchronous; dtype conversion and shard writing run on a writer thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import torch

from extract.errors import ExtractError, first_line
from extract.sources import (
    DatasetSource,
    ModelSource,
    iter_texts,
    load_model,
    resolve_dataset,
    resolve_model,
)
from jax_sae.data.cache import PRODUCER_OPEN, CacheWriter, hook_name
from jax_sae.util.disk import DiskFullError, disk_full_error, is_disk_full
from jax_sae.util.files import write_json_atomic

if TYPE_CHECKING:  # imported where a model loads: transformers is slow to import
    from transformers import PreTrainedModel

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_TOKENS = 131_072  # ~600 MB per layer and shard for Gemma-2-2b in bfloat16
# Long documents are tokenised from a prefix of this many characters per context token; when the
# prefix yields fewer than ctx_len + _CUT_MARGIN tokens the whole text is tokenised instead.
_PREFIX_CHARS_PER_TOKEN = 8
_CUT_MARGIN = 32
_IN_FLIGHT_BATCHES = 2  # batches queued for the writer thread before the forward loop waits


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Everything one extraction run needs; the CLI flags map 1:1 onto these fields."""

    model: str = "google/gemma-2-2b"
    dataset: tuple[str, ...] = ("monology/pile-uncopyrighted",)
    split: str = "train"
    text_field: str = "text"
    layers: tuple[int, ...] = (12,)
    tokens: int = 10_000_000
    ctx_len: int = 128
    batch_size: int = 32
    dtype: str = "bfloat16"
    model_dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    out: Path | None = None  # None: activations_cache/<model>__<dataset>__L<layers>
    keep_bos: bool = False
    drop_norm_outliers: float | None = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    resume: bool = False
    revision: str | None = None
    attn_implementation: str = "eager"  # Gemma-2's attention soft-capping is exact only in eager
    progress: bool = True
    disk_budget: int | None = None  # bytes of shard files on disk at most (streaming)
    announce_open: bool = False  # write PRODUCER_OPEN once the cache is accepted (streaming)

    def validate(self) -> None:
        checks = [
            (len(self.layers) > 0, "--layers needs at least one layer"),
            (all(layer >= 0 for layer in self.layers), "--layers must be >= 0"),
            (len(set(self.layers)) == len(self.layers), "--layers lists a layer twice"),
            (self.tokens > 0, "--tokens must be > 0"),
            (self.ctx_len >= 2, "--ctx-len must be >= 2"),
            (self.batch_size > 0, "--batch-size must be > 0"),
            (self.shard_tokens > 0, "--shard-tokens must be > 0"),
            (self.disk_budget is None or self.disk_budget > 0, "--disk-budget must be > 0"),
            (self.dtype in TORCH_DTYPES, f"--dtype must be one of {', '.join(TORCH_DTYPES)}"),
            (
                self.model_dtype is None or self.model_dtype in TORCH_DTYPES,
                f"--model-dtype must be one of {', '.join(TORCH_DTYPES)}",
            ),
            (
                self.drop_norm_outliers is None or self.drop_norm_outliers > 1,
                "--drop-norm-outliers N drops tokens above N x the median norm; N must be > 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ExtractError(message)


# ------------------------------------------------------------------------------ model surgery


@dataclasses.dataclass(frozen=True)
class HookPoint:
    layer: int
    hook_name: str  # SAELens/TransformerLens name: blocks.{L}.hook_resid_post
    module_name: str  # where the block lives in the transformers model: model.layers.{L}
    module: torch.nn.Module


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder blocks of a transformers causal LM and their attribute path.

    Gemma, Llama, Mistral, Qwen... keep them in ``<base model>.layers``.
    """
    blocks = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ExtractError(
            f"{type(model).__name__} keeps no decoder blocks in `<base model>.layers`; only "
            "Gemma/Llama-style causal LMs are supported"
        )
    path = next(name for name, module in model.named_modules() if module is blocks)
    return path, blocks


def hook_points(model: torch.nn.Module, layers: Iterable[int]) -> list[HookPoint]:
    """The blocks whose outputs are cached, in layer order; rejects layers the model lacks."""
    path, blocks = decoder_blocks(model)
    points = []
    for layer in sorted(layers):
        if not 0 <= layer < len(blocks):
            raise ExtractError(
                f"layer {layer} does not exist: {type(model).__name__} has {len(blocks)} layers "
                f"(0-{len(blocks) - 1})"
            )
        points.append(HookPoint(layer, hook_name(layer), f"{path}.{layer}", blocks[layer]))
    return points


def truncate_after(model: PreTrainedModel, last_layer: int) -> None:
    """Keep blocks ``0..last_layer`` only: the later ones can then never run."""
    _, blocks = decoder_blocks(model)
    model.base_model.layers = torch.nn.ModuleList(list(blocks)[: last_layer + 1])


class ResidualCapture:
    """Forward hooks that keep the output of each hooked block (the residual stream after it)."""

    def __init__(self, points: Sequence[HookPoint]) -> None:
        self.points = points
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, layer: int) -> Callable:
        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output

        return keep

    def __enter__(self) -> ResidualCapture:
        self.outputs = {}
        self._handles = [p.module.register_forward_hook(self._hook(p.layer)) for p in self.points]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ------------------------------------------------------------------------------- tokenisation


def tokenize(tokenizer: Any, texts: Sequence[str], ctx_len: int) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens (Gemma: BOS first), cut to ``ctx_len``.

    Equals ``tokenizer(texts, truncation=True, max_length=ctx_len)`` for tokenizers that only
    prepend BOS. Documents can be 100k characters long while only the first ``ctx_len`` tokens
    are used, so a prefix is tokenised first and the full text only when the prefix was too short
    to leave the first ``ctx_len`` tokens unaffected by the cut.
    """
    limit = ctx_len * _PREFIX_CHARS_PER_TOKEN
    ids = tokenizer([t[:limit] for t in texts], verbose=False)["input_ids"]
    redo = [
        i for i, (t, row) in enumerate(zip(texts, ids, strict=True))
        if len(t) > limit and len(row) < ctx_len + _CUT_MARGIN
    ]  # fmt: skip
    if redo:
        full = tokenizer([texts[i] for i in redo], verbose=False)["input_ids"]
        for i, row in zip(redo, full, strict=True):
            ids[i] = row
    return [row[:ctx_len] for row in ids]


@dataclasses.dataclass
class TokenBatch:
    """One forward pass worth of sequences, right-padded, and which tokens go to the cache."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    keep: torch.Tensor  # [B, T] bool: not padding and (unless kept) not BOS
    n_texts: int


def make_batch(rows: Sequence[Sequence[int]], pad_id: int, drop_ids: Sequence[int]) -> TokenBatch:
    """Right-pad token rows (positions then start at 0 in every row, whatever the tokenizer's
    own padding side) and mark the tokens to cache."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    keep = (mask == 1) & ~np.isin(ids, drop_ids)
    return TokenBatch(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(keep), len(rows)
    )


def token_batches(
    texts: Iterator[str], tokenizer: Any, cfg: ExtractConfig, drop_ids: Sequence[int]
) -> Iterator[TokenBatch]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while chunk := list(itertools.islice(texts, cfg.batch_size)):
        yield make_batch(tokenize(tokenizer, chunk, cfg.ctx_len), pad_id, drop_ids)


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce up to ``depth`` items ahead on a background thread (exceptions re-raised here)."""
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix="extract-prefetch") as pool:
        ahead = deque(pool.submit(next, items, end) for _ in range(depth))
        while (item := ahead.popleft().result()) is not end:
            ahead.append(pool.submit(next, items, end))
            yield item


# ----------------------------------------------------------------------- device -> host -> disk


@dataclasses.dataclass
class HostBatch:
    """A batch's cached tokens, possibly still being copied from the device."""

    acts: dict[int, torch.Tensor]  # [n, d] on the host (valid once `ready` has synchronised)
    tokens: np.ndarray  # int32 [n]
    positions: np.ndarray  # int32 [n]
    n_texts: int
    ready: torch.cuda.Event | None = None


def to_host(rows: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Start the copy of ``rows`` to the host; narrow to the storage dtype first if it halves
    the bytes to move, otherwise widen later on the host (never on the device)."""
    if rows.dtype.itemsize > storage.itemsize:
        rows = rows.to(storage)
    if rows.device.type == "cpu":
        return rows
    return rows.to("cpu", non_blocking=True)


def to_numpy(rows: torch.Tensor, storage: torch.dtype) -> np.ndarray:
    """Host tensor -> numpy array in the storage dtype (bfloat16 via a bit-exact view)."""
    rows = rows.to(storage)
    if storage == torch.bfloat16:
        return rows.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return rows.numpy()


class ShardAssembler:
    """Gathers batches into shards and writes them; all methods run on the writer thread.

    A shard is cut after the batch that brings it to ``shard_tokens`` tokens, so shard
    boundaries fall on batch boundaries (what makes resume exact).
    """

    def __init__(self, writer: CacheWriter, storage: torch.dtype, shard_tokens: int) -> None:
        self.writer = writer
        self.storage = storage
        self.shard_tokens = shard_tokens
        self.parts: list[tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]] = []
        self.n_tokens = 0
        self.n_texts = 0

    def add(self, batch: HostBatch) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        acts = {layer: to_numpy(rows, self.storage) for layer, rows in batch.acts.items()}
        self.parts.append((acts, batch.tokens, batch.positions))
        self.n_tokens += len(batch.tokens)
        self.n_texts += batch.n_texts
        if self.n_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        layers = self.parts[0][0].keys()
        acts = {layer: np.concatenate([p[0][layer] for p in self.parts]) for layer in layers}
        tokens = np.concatenate([p[1] for p in self.parts])
        positions = np.concatenate([p[2] for p in self.parts])
        self.writer.write_shard(acts, tokens, positions, self.n_texts)
        self.parts, self.n_tokens, self.n_texts = [], 0, 0


# ------------------------------------------------------------------------------------ the run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ExtractError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError(f"--device {name} but torch sees no CUDA device; use --device cpu")
    return device


def default_out(cfg: ExtractConfig, dataset: DatasetSource) -> Path:
    """``activations_cache/<model>__<dataset>__L<layers>``: gemma-2-2b__pile-uncopyrighted__L12."""
    model = Path(cfg.model.rstrip("/")).name
    layers = "_".join(str(layer) for layer in sorted(cfg.layers))
    return Path("activations_cache") / f"{model}__{dataset.short_name}__L{layers}"


def _versions() -> dict:
    import datasets
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def _settings(cfg: ExtractConfig, model_dtype: str) -> dict:
    """What must be equal for a resumed run to continue the same cache (JSON-native values)."""
    return {
        "model": cfg.model,
        "revision": cfg.revision,
        "dataset": list(cfg.dataset),
        "split": cfg.split,
        "text_field": cfg.text_field,
        "layers": sorted(cfg.layers),
        "ctx_len": cfg.ctx_len,
        "tokens": cfg.tokens,
        "batch_size": cfg.batch_size,
        "shard_tokens": cfg.shard_tokens,
        "dtype": cfg.dtype,
        "model_dtype": model_dtype,
        "attn_implementation": cfg.attn_implementation,
        "keep_bos": cfg.keep_bos,
        "drop_norm_outliers": cfg.drop_norm_outliers,
    }


def _metadata(
    model: PreTrainedModel,
    tokenizer: Any,
    source: ModelSource,
    dataset: DatasetSource,
    cfg: ExtractConfig,
    points: Sequence[HookPoint],
    dropped: dict,
    device: torch.device,
) -> dict:
    return {
        "model": cfg.model,
        "model_revision": source.revision,
        "model_class": type(model).__name__,
        "model_n_layers": int(model.config.num_hidden_layers),
        "module_names": {str(p.layer): p.module_name for p in points},
        "tokenizer": cfg.model,
        "tokenizer_class": type(tokenizer).__name__,
        "prepend_bos": prepends_bos(tokenizer),
        "context_size": cfg.ctx_len,
        "dataset": dataset.names[0] if len(dataset.names) == 1 else list(dataset.names),
        "dataset_revision": dataset.revision,
        "dataset_split": dataset.split,
        "dataset_text_field": dataset.text_field,
        "dropped_tokens": dropped,
        "device": str(device),
        "versions": _versions(),
    }


def prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every sequence with BOS (Gemma does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _dropped_tokens(tokenizer: Any, cfg: ExtractConfig) -> tuple[list[int], dict]:
    """Token ids never cached, and the manifest's record of everything that is dropped."""
    special = {"pad": {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id, "by": "mask"}}
    drop_ids = []
    if not cfg.keep_bos and prepends_bos(tokenizer):
        drop_ids.append(int(tokenizer.bos_token_id))
        special["bos"] = {"token": tokenizer.bos_token, "id": tokenizer.bos_token_id, "by": "id"}
    return drop_ids, {"special": special, "norm_outlier_factor": cfg.drop_norm_outliers}


class Extraction:
    """One run: model and tokenizer loaded and truncated, batches in, shards out.

    Construction does every check that can fail (sources, dataset field, layers) before any
    file is written; ``run()`` is called once.
    """

    def __init__(self, cfg: ExtractConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.model_dtype = cfg.model_dtype or default_dtype
        self.storage = TORCH_DTYPES[cfg.dtype]
        self.source = resolve_model(cfg.model, cfg.revision)
        self.dataset = resolve_dataset(cfg.dataset, cfg.split, cfg.text_field)
        self.out = Path(cfg.out) if cfg.out is not None else default_out(cfg, self.dataset)
        if self.out.exists() and not self.out.is_dir():
            raise ExtractError(f"--out {self.out} is a file; pass a folder for the cache")
        self.writer: CacheWriter | None = None
        self.texts = self._open_texts()
        model, self.tokenizer = load_model(
            self.source, TORCH_DTYPES[self.model_dtype], cfg.attn_implementation
        )
        self.points = hook_points(model, cfg.layers)
        self.d_model = int(model.config.hidden_size)
        self.drop_ids, dropped = _dropped_tokens(self.tokenizer, cfg)
        self.metadata = _metadata(
            model, self.tokenizer, self.source, self.dataset, cfg, self.points, dropped,
            self.device,
        )  # fmt: skip
        truncate_after(model, self.points[-1].layer)
        # Only the base model runs and moves to the device: the LM head is never needed.
        self.forward = model.base_model.to(self.device)

    def _open_texts(self) -> Iterator[str]:
        """Read the first text now, so a bad dataset fails before the model loads."""
        texts = iter_texts(self.dataset)
        first = next(texts, None)
        if first is None:
            raise ExtractError(f"dataset '{self.dataset.names[0]}' has no non-empty texts")
        return itertools.chain([first], texts)

    def run(self) -> Path:
        """Extract until ``cfg.tokens`` are cached (or the data ends); resumable at any point."""
        cfg = self.cfg
        self.writer = writer = CacheWriter(
            self.out,
            layers=[p.layer for p in self.points],
            d_model=self.d_model,
            dtype=cfg.dtype,
            settings=_settings(cfg, self.model_dtype),
            metadata=self.metadata,
            resume=cfg.resume,
            disk_budget=cfg.disk_budget,
        )
        if cfg.announce_open:  # the trainer beside us learns that its settings were accepted
            write_json_atomic(self.out / PRODUCER_OPEN, {"pid": os.getpid()})
        if writer.manifest.get("complete"):
            print(f"{self.out} is already complete ({writer.n_tokens} tokens)", file=sys.stderr)
            return self.out
        texts = itertools.islice(self.texts, writer.n_sequences, None)  # skip complete shards
        assembler = ShardAssembler(writer, self.storage, cfg.shard_tokens)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.tokens, initial=writer.n_tokens, unit="tok", unit_scale=True,
            desc=f"extract {self.out.name}", disable=not cfg.progress, smoothing=0.1,
        )  # fmt: skip
        n_tokens = writer.n_tokens
        pending: deque[Future] = deque()
        with (
            bar,
            ThreadPoolExecutor(1, thread_name_prefix="extract-writer") as pool,
            torch.inference_mode(),
        ):
            try:
                for batch in prefetch(token_batches(texts, self.tokenizer, cfg, self.drop_ids)):
                    host = self._forward(batch, cfg.tokens - n_tokens)
                    pending.append(pool.submit(assembler.add, host))
                    while len(pending) > _IN_FLIGHT_BATCHES:
                        pending.popleft().result()
                    n_tokens += len(host.tokens)
                    bar.update(len(host.tokens))
                    if n_tokens >= cfg.tokens:
                        break
                pending.append(pool.submit(assembler.flush))
                for future in pending:
                    future.result()
            except BaseException:
                writer.stop.set()  # a writer waiting for disk budget would hold up the exit
                raise
        if n_tokens < cfg.tokens:
            print(
                f"warning: the dataset ended after {n_tokens} of {cfg.tokens} tokens",
                file=sys.stderr,
            )
        writer.finish()
        return self.out

    def _forward(self, batch: TokenBatch, budget: int) -> HostBatch:
        """Run the truncated model on one batch; start copying the kept rows to the host."""
        flat_keep = batch.keep.reshape(-1)
        index = flat_keep.nonzero().squeeze(1)
        width = batch.input_ids.shape[1]
        tokens = batch.input_ids.reshape(-1)[index].to(torch.int32).numpy()
        positions = (index % width).to(torch.int32).numpy()
        device_index = index.to(self.device, non_blocking=True)
        with ResidualCapture(self.points) as capture:
            self.forward(
                input_ids=batch.input_ids.to(self.device, non_blocking=True),
                attention_mask=batch.attention_mask.to(self.device, non_blocking=True),
                use_cache=False,
            )
        rows = {
            layer: out.reshape(-1, self.d_model).index_select(0, device_index)
            for layer, out in capture.outputs.items()
        }
        if self.cfg.drop_norm_outliers is not None:
            ok = _below_norm_limit(rows, self.cfg.drop_norm_outliers)
            rows = {layer: r[ok.to(self.device)] for layer, r in rows.items()}
            index, tokens, positions = index[ok], tokens[ok.numpy()], positions[ok.numpy()]
        n_texts = batch.n_texts
        if len(tokens) > budget:  # the last batch: keep exactly the tokens still wanted
            rows = {layer: r[:budget] for layer, r in rows.items()}
            index, tokens, positions = index[:budget], tokens[:budget], positions[:budget]
            n_texts = int(index[-1]) // width + 1 if budget else 0
        acts = {layer: to_host(r, self.storage) for layer, r in rows.items()}
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return HostBatch(acts, tokens, positions, n_texts, ready)

    def bytes_still_needed(self) -> int:
        """What the shards still to be written take on disk (all layers, tokens, positions)."""
        done = self.writer.n_tokens if self.writer is not None else 0
        per_token = len(self.points) * self.d_model * self.storage.itemsize + 8
        return max(self.cfg.tokens - done, 0) * per_token


def _below_norm_limit(rows: dict[int, torch.Tensor], factor: float) -> torch.Tensor:
    """Host bool mask of tokens whose norm is <= factor x the batch median at every layer."""
    ok: torch.Tensor | None = None
    for r in rows.values():
        norms = r.float().norm(dim=1)
        layer_ok = norms <= factor * norms.median() if len(norms) else norms > 0
        ok = layer_ok if ok is None else ok & layer_ok
    assert ok is not None  # one entry per hooked layer, and ExtractConfig wants at least one
    return ok.cpu()


def extract(cfg: ExtractConfig) -> Path:
    """Run one extraction; returns the cache folder."""
    extraction = None
    try:
        extraction = Extraction(cfg)
        return extraction.run()
    except torch.cuda.OutOfMemoryError as e:
        raise ExtractError(
            f"out of GPU memory ({first_line(e)}); lower --batch-size (resume with --resume)"
        ) from e
    except DiskFullError as e:  # checked before writing a shard: it names what did not fit
        raise ExtractError(str(e)) from e
    except OSError as e:
        if extraction is None or not is_disk_full(e):
            raise
        needed = extraction.bytes_still_needed()
        error = disk_full_error(extraction.out, needed, e, "rerun with --resume")
        raise ExtractError(str(error)) from e
