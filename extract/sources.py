"""Where the model and the text come from: local folders and files, or the Hugging Face hub.

A local path and a hub id go through the same loaders (``from_pretrained``, ``datasets``), so the
embedded tiny model is treated exactly like ``google/gemma-2-2b``. Hub access is checked once, up
front, with a short timeout (``model_info`` / ``dataset_info``, which do not retry): a missing
repository or an unreachable hub is a one-line error within seconds, instead of transformers'
minutes of download retries. When the hub cannot be reached a copy in the local Hugging Face cache
is used with ``local_files_only=True`` - never a retried download.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from extract.errors import ExtractError, first_line

if TYPE_CHECKING:  # imported where a model loads: transformers is slow to import
    from transformers import PreTrainedModel


HUB_TIMEOUT_S = 10.0
# local data files -> the `datasets` builder that reads them
DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".csv": "csv",
    ".parquet": "parquet",
}
_TINY_MODEL_HINT = "`make tiny-model` builds the offline default in models/tiny-gemma2"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or Path(name).suffix in DATA_FILE_BUILDERS
    )


class HubStatus(NamedTuple):
    reachable: bool
    sha: str | None  # commit of the checked revision; None when the hub was not reached


def _check_hub(kind: str, repo_id: str, revision: str | None) -> HubStatus:
    """Ask the hub about a repository once, with a timeout; raise when it surely cannot be used."""
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _hub_offline():
        return HubStatus(False, None)
    info = huggingface_hub.model_info if kind == "model" else huggingface_hub.dataset_info
    url = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    try:
        return HubStatus(True, info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S).sha)
    except GatedRepoError as e:
        raise ExtractError(
            f"{kind} '{repo_id}' is gated: accept its terms on {url} and log in with "
            "`hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise ExtractError(
            f"{kind} '{repo_id}' is neither a local path nor a repository on the Hugging Face hub "
            "(check the name; private repositories need `hf auth login`)"
        ) from e
    except RevisionNotFoundError as e:
        raise ExtractError(f"{kind} '{repo_id}' has no revision '{revision}'") from e
    except HFValidationError as e:
        raise ExtractError(f"{kind} '{repo_id}' is neither a local path nor a valid hub id") from e
    except Exception:  # DNS, refused connection, timeout, proxy, 5xx: the hub is not reachable
        return HubStatus(False, None)


def _unreachable(kind: str, name: str, fix: str) -> ExtractError:
    reason = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face hub is unreachable"
    return ExtractError(
        f"{kind} '{name}' is not a local path, {reason} and it is not in the local Hugging Face "
        f"cache; {fix}"
    )


# ----------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it (recorded in the manifest)
    location: str  # local folder or hub id, handed to from_pretrained
    revision: str | None  # hub commit to load; None for a local folder
    local_files_only: bool


def resolve_model(name: str, revision: str | None = None) -> ModelSource:
    """Decide where the model comes from, failing fast (seconds) when it cannot be had."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExtractError(f"model folder '{name}' has no config.json; {_TINY_MODEL_HINT}")
        return ModelSource(name, str(path), None, local_files_only=True)
    if path.exists():
        raise ExtractError(f"model path '{name}' is a file; pass the model folder")
    if _looks_like_path(name):
        raise ExtractError(f"model folder '{name}' does not exist; {_TINY_MODEL_HINT}")
    status = _check_hub("model", name, revision)
    if status.reachable:
        return ModelSource(name, name, status.sha, local_files_only=False)
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise _unreachable(
            "model",
            name,
            f"run where the hub is reachable or pass a local folder ({_TINY_MODEL_HINT})",
        )
    return ModelSource(name, name, revision, local_files_only=True)


def _dtype_kwarg() -> str:
    """transformers 4.56 renamed ``torch_dtype`` to ``dtype``; both are supported here."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(
    source: ModelSource, dtype: torch.dtype, attn_implementation: str
) -> tuple[PreTrainedModel, Any]:
    """Load the causal LM (on CPU, in ``dtype``) and its tokenizer, exactly as from the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": source.revision, "local_files_only": source.local_files_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.location,
            attn_implementation=attn_implementation,
            **{_dtype_kwarg(): dtype},
            **kwargs,
        )
    except (OSError, ValueError, ImportError) as e:
        raise ExtractError(f"cannot load model '{source.name}': {first_line(e)}") from e
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------ dataset


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    names: tuple[str, ...]  # as the user gave them (recorded in the manifest)
    kind: str  # "files" | "saved" (save_to_disk folder) | "folder" | "hub" | "hub-cache"
    split: str
    text_field: str
    revision: str | None = None  # hub commit

    @property
    def short_name(self) -> str:
        """For default cache folder names: ``pile-uncopyrighted``, ``stdlib_docstrings``."""
        first = Path(self.names[0].rstrip("/"))
        return first.stem if self.kind == "files" else first.name


def resolve_dataset(names: Sequence[str], split: str, text_field: str) -> DatasetSource:
    """Decide where the text comes from (local files, a local folder, the hub); fail fast."""
    names = tuple(names)
    paths = [Path(n).expanduser() for n in names]
    if len(names) == 1 and paths[0].is_dir():
        saved = (paths[0] / "dataset_dict.json").is_file() or (paths[0] / "state.json").is_file()
        return DatasetSource(names, "saved" if saved else "folder", split, text_field)
    local = [p.exists() or _looks_like_path(n) for n, p in zip(names, paths, strict=True)]
    if any(local) or len(names) > 1:
        for name, path in zip(names, paths, strict=True):
            if not path.is_file():
                raise ExtractError(f"dataset file '{name}' does not exist")
            if path.stat().st_size == 0:
                raise ExtractError(f"dataset file '{name}' is empty; pass a file with texts")
        suffixes = {p.suffix for p in paths}
        if len(suffixes) > 1 or not suffixes <= DATA_FILE_BUILDERS.keys():
            raise ExtractError(
                f"dataset files must all have one of the suffixes {sorted(DATA_FILE_BUILDERS)}, "
                f"got {sorted(suffixes)}"
            )
        return DatasetSource(names, "files", split, text_field)
    status = _check_hub("dataset", names[0], None)
    if status.reachable:
        return DatasetSource(names, "hub", split, text_field, status.sha)
    if _hub_offline():  # `datasets` may have a downloaded copy in its cache
        return DatasetSource(names, "hub-cache", split, text_field)
    raise _unreachable("dataset", names[0], "run where the hub is reachable or pass local files")


def _open_dataset(source: DatasetSource) -> Any:
    """An iterable of row dicts in a fixed order (streamed when possible: no conversion pass)."""
    import datasets

    if source.kind == "files":
        builder = DATA_FILE_BUILDERS[Path(source.names[0]).suffix]
        files = {source.split: list(source.names)}
        return datasets.load_dataset(builder, data_files=files, split=source.split, streaming=True)
    if source.kind == "saved":
        data = datasets.load_from_disk(source.names[0])
        return data[source.split] if isinstance(data, datasets.DatasetDict) else data
    if source.kind == "hub-cache":
        return datasets.load_dataset(source.names[0], split=source.split)
    return datasets.load_dataset(
        source.names[0], split=source.split, streaming=True, revision=source.revision
    )


def iter_texts(source: DatasetSource) -> Iterator[str]:
    """Non-empty texts of the dataset in its stored order (the order resume relies on)."""
    import datasets

    try:
        for row in _open_dataset(source):
            if source.text_field not in row:
                raise ExtractError(
                    f"dataset '{source.names[0]}' has no field '{source.text_field}' (it has "
                    f"{', '.join(sorted(row))}); pass --text-field"
                )
            text = row[source.text_field]
            if not isinstance(text, str):
                raise ExtractError(
                    f"dataset field '{source.text_field}' holds {type(text).__name__}, not text; "
                    "pass --text-field"
                )
            if text.strip():
                yield text
    except ExtractError:
        raise
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as e:
        raise ExtractError(f"cannot read dataset '{source.names[0]}': {first_line(e)}") from e
    except RuntimeError as e:  # `datasets` lets a StopIteration escape on data it cannot parse
        raise ExtractError(
            f"cannot read dataset '{source.names[0]}' ({first_line(e)}); check that it is a "
            "non-empty file of the format its suffix names"
        ) from e
