"""SAELens's BatchTopK, trained by SAELens's own trainer on a SynthSAEBench world (`.venv-eval`).

    python benchmarks/saelens_synth_worker.py --out DIR --world-cache CACHE --width W --k K
        --seed S --lr LR --batch-size B (--batches ORDER.npy | --samples N) [--eval-samples N]

`benchmarks/synthsaebench.py` runs it beside our BatchTopK:
* with --batches, step s trains on the cache rows ORDER[s] - the batches our trainer drew for the
  same seed - through `SAETrainer`, the trainer `SyntheticSAERunner` runs, configured by
  `SyntheticSAERunnerConfig.to_sae_trainer_config()` (the runner's own defaults for all but the
  sizes, lr and batch size);
* without, `SyntheticSAERunner` itself trains on N fresh samples of SAELens's sampler (the
  published protocol on a GPU: the sampler draws ~240 samples/s on a CPU at 16k features).

The trained SAE is saved as SAELens saves it for inference (BatchTopK as JumpReLU) and scored by
`synth.evaluate` on the cache CACHE, like our runs. DIR/result.json holds the metrics and the
training samples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jax_sae.data.cache import ActivationCache  # noqa: E402
from jax_sae.util.files import write_json_atomic  # noqa: E402
from synth.evaluate import evaluate_sae  # noqa: E402
from synth.make_world import WORLD_DIR  # noqa: E402


class OrderedRows:
    """SAELens's data provider over cache rows: batch s is rows `order[s]` (float32)."""

    def __init__(self, acts: np.ndarray, order: np.ndarray) -> None:
        self.acts, self.order, self.step = acts, order, 0

    def __iter__(self) -> OrderedRows:
        return self

    def __next__(self) -> torch.Tensor:
        if self.step == len(self.order):
            raise StopIteration
        rows = self.acts[self.order[self.step]]
        self.step += 1
        return torch.from_numpy(rows)


def runner_config(args: argparse.Namespace, samples: int):  # noqa: ANN201 - SAELens's type
    from sae_lens import BatchTopKTrainingSAEConfig, LoggingConfig
    from sae_lens.synthetic import SyntheticSAERunnerConfig

    sae = BatchTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.width, k=args.k)
    return SyntheticSAERunnerConfig(
        synthetic_model=str(args.world_cache / WORLD_DIR), sae=sae, training_samples=samples,
        batch_size=args.batch_size, lr=args.lr, device="cpu", output_path=None,
        checkpoint_path=None, eval_samples=0, run_final_eval=False,
        logger=LoggingConfig(log_to_wandb=False),
        **({} if args.dead_window is None else {"dead_feature_window": args.dead_window}),
    )  # fmt: skip


def train_on_batches(args: argparse.Namespace) -> tuple[object, int, float]:
    """(the trained SAE, samples, seconds) on the given batch order of the cache."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    order = np.load(args.batches)
    cache = ActivationCache(args.world_cache)
    last = int(order.max()) + 1
    acts = np.ascontiguousarray(cache.acts(cache.layers[0])[:last], dtype=np.float32)
    cfg = runner_config(args, order.size)
    torch.manual_seed(args.seed)
    sae_class, _ = get_sae_training_class(cfg.sae.architecture())
    sae = sae_class(cfg.sae)
    trainer = SAETrainer(
        cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=OrderedRows(acts, order),
        evaluator=None, save_checkpoint_fn=lambda *_, **__: None,
    )  # fmt: skip
    start = time.perf_counter()
    trained = trainer.fit()
    return trained, order.size, time.perf_counter() - start


def train_on_sampler(args: argparse.Namespace) -> tuple[object, int, float]:
    """(the trained SAE, samples, seconds) with SyntheticSAERunner drawing its own samples."""
    from sae_lens.synthetic import SyntheticSAERunner

    torch.manual_seed(args.seed)
    runner = SyntheticSAERunner(runner_config(args, args.samples))
    start = time.perf_counter()
    result = runner.run()
    return result.sae, args.samples, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--world-cache", type=Path, required=True, help="a cache of synth.world_cache")
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--k", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--batches", type=Path, help="[steps, batch] row order (.npy)")
    p.add_argument("--samples", type=int, help="without --batches: samples of SAELens's sampler")
    p.add_argument("--eval-samples", type=int, default=65536)
    p.add_argument(
        "--dead-window",
        type=int,
        help="steps unfired before AuxK counts a latent dead (default: SAELens's)",
    )
    args = p.parse_args(argv)
    args.d_in = ActivationCache(args.world_cache).d_model
    trained, samples, seconds = (train_on_batches if args.batches else train_on_sampler)(args)
    inference = args.out / "saelens"
    trained.save_inference_model(inference)  # type: ignore[attr-defined]
    from sae_lens import SAE

    sae = SAE.load_from_disk(inference, device="cpu")
    same = args.batches is not None
    result = evaluate_sae(sae, args.world_cache, args.eval_samples, heldout=same)
    record = {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
              "seed": args.seed, "lr": args.lr, "dead_window": args.dead_window,
              "batch_size": args.batch_size, "same_batches": same, "synthetic": result}  # fmt: skip
    write_json_atomic(args.out / "result.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "synthetic"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
