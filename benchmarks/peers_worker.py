"""PyTorch side of `bench_peers.py`; runs in .venv-peers (SAELens, sparsify, dictionary_learning).

Reads one JSON command per line on stdin and answers one JSON line on the original stdout (the
libraries' own prints go to stderr). Commands:

    {"cmd": "build", "lib": ..., "variant": ..., "d": ..., "F": ..., "k": ..., "lr": ...,
     "warmup": ..., "steps": ..., "batch": ..., "seed": ...}      -> {"id": n}
    {"cmd": "step", "id": n, "data": "file.npy", "batch": B, "index": i}  -> {"seconds": t}
    {"cmd": "eval", "id": n, "data": "file.npy"}  -> {"explained_variance", "l0", "dead_frac"}
    {"cmd": "free", "id": n}

Every library is driven through its own training code: SAELens `SAETrainer.step`,
dictionary_learning `Trainer.update`, and for sparsify (whose `Trainer.fit` is welded to a
language-model hook) the body of its `fit` update: `SparseCoder.forward` with the dead mask,
the loss `fvu + auxk_alpha * auxk_loss`, backward, `remove_gradient_parallel_to_decoder_directions`,
`torch.optim.Adam`, `set_decoder_norm_to_unit_norm`, dead-token counts, b_dec = batch mean on
step 0.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
DEAD_TOKENS = 10_000_000  # every library's default window


def warmup_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


class SAELens:
    def __init__(self, variant, d, F, k, lr, warmup, steps, batch, seed):
        from sae_lens import (
            JumpReLUTrainingSAE,
            JumpReLUTrainingSAEConfig,
            StandardTrainingSAE,
            StandardTrainingSAEConfig,
            TopKTrainingSAE,
            TopKTrainingSAEConfig,
        )
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(seed)
        if variant in ("topk", "topk_sparse"):
            config = TopKTrainingSAEConfig(
                d_in=d,
                d_sae=F,
                k=k,
                aux_loss_coefficient=1 / 32,
                use_sparse_activations=variant == "topk_sparse",
            )
            sae = TopKTrainingSAE(config)
        elif variant == "standard":
            config = StandardTrainingSAEConfig(d_in=d, d_sae=F, l1_coefficient=0.04)
            sae = StandardTrainingSAE(config)
        else:
            sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=F))
        cfg = SAETrainerConfig(
            total_training_samples=steps * batch,
            train_batch_size_samples=batch,
            lr=lr,
            lr_end=lr,  # constant schedule; the trainer asserts that the runner config set it
            lr_warm_up_steps=warmup,
            dead_feature_window=max(1, DEAD_TOKENS // batch),
        )
        self.sae, self.trainer = sae, SAETrainer(cfg, sae, data_provider=iter(()))

    def step(self, x, index):
        self.trainer.step(x)
        self.trainer.n_training_steps += 1

    def codes_and_reconstruction(self, x):
        h = self.sae.encode(x)
        return h, self.sae.decode(h)


class DictionaryLearning:
    def __init__(self, variant, d, F, k, lr, warmup, steps, batch, seed):
        from dictionary_learning.trainers.jumprelu import JumpReluTrainer
        from dictionary_learning.trainers.standard import StandardTrainer
        from dictionary_learning.trainers.top_k import TopKTrainer

        common = dict(steps=steps, activation_dim=d, dict_size=F, layer=0, lm_name="bench")
        common |= dict(lr=lr, warmup_steps=warmup, device="cpu")
        sparsity_warmup = min(2000, steps // 10)  # the default 2000 must be < steps
        if variant == "topk":
            self.trainer = TopKTrainer(k=k, seed=seed, **common)
        elif variant == "standard":
            self.trainer = StandardTrainer(
                l1_penalty=0.04, seed=seed, sparsity_warmup_steps=sparsity_warmup, **common
            )
        else:
            self.trainer = JumpReluTrainer(
                seed=seed, sparsity_warmup_steps=sparsity_warmup, **common
            )

    def step(self, x, index):
        self.trainer.update(index, x)

    def codes_and_reconstruction(self, x):
        h = self.trainer.ae.encode(x)
        return h, self.trainer.ae.decode(h)


class Sparsify:
    def __init__(self, variant, d, F, k, lr, warmup, steps, batch, seed):
        from sparsify import SparseCoder, SparseCoderConfig

        assert variant == "topk", "sparsify trains TopK SAEs only"
        torch.manual_seed(seed)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=F, k=k), device="cpu")
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda(warmup))
        self.tokens_since_fired = torch.zeros(F, dtype=torch.long)
        self.auxk_alpha = 1 / 32  # sparsify's TrainConfig default

    def step(self, x, index):
        sae = self.sae
        if index == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=self.tokens_since_fired > DEAD_TOKENS)
        (out.fvu + self.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.schedule.step()
        with torch.no_grad():
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0

    def codes_and_reconstruction(self, x):
        acts, indices, _ = self.sae.encode(x)
        h = torch.zeros(x.shape[0], self.sae.num_latents).scatter_(1, indices, acts)
        return h, self.sae.decode(acts, indices)


LIBRARIES = {"saelens": SAELens, "dictionary_learning": DictionaryLearning, "sparsify": Sparsify}


def evaluate(model, x):
    with torch.no_grad():
        h, x_hat = model.codes_and_reconstruction(x)
        residual = torch.sum((x - x_hat) ** 2)
        total = torch.sum((x - x.mean(0)) ** 2)
        return {
            "explained_variance": float(1 - residual / total),
            "l0": float((h > 0).sum(1).float().mean()),
            "dead_frac": float(((h > 0).sum(0) == 0).float().mean()),
        }


def main():
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints go to stderr
    models, data = {}, {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "build":
                args = {key: cmd[key] for key in ("variant", "d", "F", "k", "lr", "warmup")}
                args |= {key: cmd[key] for key in ("steps", "batch", "seed")}
                models[len(models)] = LIBRARIES[cmd["lib"]](**args)
                reply = {"id": len(models) - 1}
            elif cmd["cmd"] == "free":
                models.pop(cmd["id"])
                reply = {}
            else:
                if cmd["data"] not in data:
                    data[cmd["data"]] = np.load(cmd["data"], mmap_mode="r")
                array = data[cmd["data"]]
                if cmd["cmd"] == "step":
                    b = cmd["batch"]
                    i = cmd["index"] % (len(array) // b)
                    x = torch.from_numpy(np.array(array[i * b : (i + 1) * b]))
                    start = time.perf_counter()
                    models[cmd["id"]].step(x, cmd["index"])
                    reply = {"seconds": time.perf_counter() - start}
                else:
                    reply = evaluate(models[cmd["id"]], torch.from_numpy(np.array(array)))
        except Exception as error:  # reported to the orchestrator, which records it
            where = traceback.extract_tb(error.__traceback__)[-1]
            place = f"{Path(where.filename).name}:{where.lineno} `{where.line}`"
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            reply = {"error": f"{type(error).__name__}: {message} (at {place})"}
        answer.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
