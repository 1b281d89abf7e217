"""Offline inputs for SAEBench: a local model and a local tokenized corpus.

SAEBench evaluates through TransformerLens, whose `from_pretrained` only knows hub model names.
For a local model (the embedded tiny Gemma-2) we build the `HookedTransformerConfig` from the
folder's `Gemma2Config` and convert the weights with TransformerLens's own Gemma converter, so the
hooked model computes exactly what the extractor's `AutoModelForCausalLM` computed. The corpus
(a `.jsonl` with a `text` field) is tokenized with SAELens's own pretokenizer, exactly as SAEBench's
hub datasets are.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from sae_lens.config import PretokenizeRunnerConfig
from sae_lens.pretokenize_runner import pretokenize_dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config


class OfflineInputError(ValueError):
    """A local model folder or corpus that cannot be used; the message names the fix."""


def gemma2_hooked_config(hf_config: Gemma2Config, name: str) -> HookedTransformerConfig:
    """TransformerLens's Gemma-2 settings (its `google/gemma-2-*` table), read from a config."""
    if hf_config.model_type != "gemma2":
        raise OfflineInputError(
            f"{name} is a '{hf_config.model_type}' model; local evaluation supports gemma2 only"
        )
    return HookedTransformerConfig(
        model_name=name,
        original_architecture="Gemma2ForCausalLM",
        d_model=hf_config.hidden_size,
        d_head=hf_config.head_dim,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        d_vocab=hf_config.vocab_size,
        eps=hf_config.rms_norm_eps,
        act_fn=hf_config.hidden_activation,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=hf_config.rope_parameters["rope_theta"],
        rotary_dim=hf_config.head_dim,
        use_attn_scale=True,
        attn_scale=math.sqrt(hf_config.query_pre_attn_scalar),
        use_local_attn=True,
        window_size=hf_config.sliding_window,
        attn_types=[
            "local" if t == "sliding_attention" else "global" for t in hf_config.layer_types
        ],
        attn_scores_soft_cap=hf_config.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=hf_config.final_logit_softcapping or -1.0,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        dtype=torch.float32,
        device="cpu",
    )


def hooked_transformer_from_folder(model_dir: str | Path) -> HookedTransformer:
    """Load a local Gemma-2 folder (weights + tokenizer) as a float32 CPU HookedTransformer."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise OfflineInputError(
            f"{model_dir} is not a model folder (no config.json); build the tiny model with "
            "`make tiny-model`"
        )
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = gemma2_hooked_config(hf_model.config, model_dir.name)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        convert_gemma_weights(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def tokenized_corpus(
    corpus: str | Path, model: HookedTransformer, context_size: int, seed: int = 42
) -> Dataset:
    """Rows of `context_size` token ids (column `input_ids`) from a `.jsonl` with a `text` field:
    texts concatenated with BOS separators, each row starting with BOS, rows shuffled."""
    corpus = Path(corpus)
    if not corpus.is_file():
        raise OfflineInputError(f"corpus {corpus} does not exist; pass --dataset FILE.jsonl")
    texts = load_dataset("json", data_files=str(corpus), split="train")
    if "text" not in texts.column_names:
        raise OfflineInputError(f"{corpus} has no 'text' field (fields: {texts.column_names})")
    settings = PretokenizeRunnerConfig(
        tokenizer_name=model.cfg.model_name,
        dataset_path=str(corpus),
        context_size=context_size,
        column_name="text",
        shuffle=True,
        seed=seed,
        num_proc=1,
    )
    tokens = pretokenize_dataset(texts, model.tokenizer, settings)
    if len(tokens) == 0:
        raise OfflineInputError(f"{corpus} holds fewer than {context_size} tokens")
    return tokens
