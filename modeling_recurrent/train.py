"""Variable-depth training (`recurrent-depth train`).

The model is trained as in the paper: each optimizer step draws its depth from the Poisson-lognormal sampler and
backpropagates only through the last `mean_backprop_depth` steps. The depth is drawn from a generator seeded by
(seed, step), identically on every rank, and every rank takes its slice of one global batch, so
`torchrun --nproc_per_node N` (DDP over gloo on CPU, nccl on GPU) follows the same loss curve as one process with the
same global batch. Checkpoints are `save_pretrained` folders plus the optimizer state, written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

from .chain_task import SPLITS, build_tokenizer, evaluate_first_token
from .chain_training import ChainBatches, paced_labels
from .deep_supervision import StepwiseLoss, causal_lm
from .generation_recurrent_depth import sample_num_steps
from .train_args import TrainArgs, args_from_namespace
from .train_args import add_arguments as add_arguments  # the command-line interface cli.py looks for

STATE_FILE = "trainer_state.pt"


def distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun. With CUDA each process
    trains on the GPU of its LOCAL_RANK (nccl), else on the CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world, device) if world > 1 else (0, 1, device)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying norm weights, biases or the (tied) embedding would pull the
    sandwich norms toward zero."""
    decay: list[torch.nn.Parameter] = []
    keep: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 and "wte" not in name else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_model(args: TrainArgs):
    """The model to train: a fine-tuned checkpoint (optionally with LoRA) or a fresh one from a config."""
    torch.manual_seed(args.seed)  # same initial weights on every rank and in every equivalent run
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, **args.config_overrides)
    else:
        if not args.config:
            raise ValueError("give --model (a checkpoint to fine-tune) or --config (a preset or config folder)")
        config = AutoConfig.from_pretrained(_config_path(args.config), **args.config_overrides)
        model = AutoModelForCausalLM.from_config(config)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            target_modules=["Wqkv", "proj", "fc", "adapter"],
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    return model


def _config_path(name: str) -> str:
    if Path(name).is_dir():
        return name
    from .configuration import preset_path

    return str(preset_path(name))


def load_text_blocks(args: TrainArgs, tokenizer) -> torch.Tensor:
    """Local .txt / .jsonl files (through `datasets`), tokenized and packed into (N, seq_len) blocks."""
    from datasets import load_dataset

    path = Path(args.data)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".json"))
    else:
        files = [str(path)] if path.is_file() else []
    if not files:
        raise ValueError(f"--data {args.data!r}: not 'chain' and no .txt / .jsonl files found there")
    dataset = load_dataset("text" if files[0].endswith(".txt") else "json", data_files=files, split="train")
    if args.text_field not in dataset.column_names:
        raise ValueError(f"--data has columns {dataset.column_names}; choose one with --text-field")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in dataset[args.text_field]:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids + eos)
    blocks = torch.tensor(ids[: len(ids) // args.seq_len * args.seq_len]).view(-1, args.seq_len)
    if len(blocks) < args.batch_size:
        raise ValueError(f"--data gives {len(blocks)} sequences of {args.seq_len} tokens, fewer than one batch")
    return blocks


def text_batch(blocks: torch.Tensor, batch_size: int, seed: int, step: int) -> dict[str, torch.Tensor]:
    """The global batch of `step`: `batch_size` blocks drawn without replacement by a generator seeded by the step."""
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    batch = blocks[order[:batch_size]]
    return {"input_ids": batch, "labels": batch.clone(), "attention_mask": torch.ones_like(batch)}


class Trainer:
    """Runs `args.steps` optimizer steps with periodic evaluation and resumable checkpoints."""

    def __init__(self, args: TrainArgs):
        self.args = args
        self.rank, self.world, self.device = distributed_setup()
        if args.batch_size % self.world:
            raise ValueError(
                f"--batch-size {args.batch_size} must be divisible by the number of processes {self.world}"
            )
        if args.fsdp and args.lora_rank:
            raise ValueError("--fsdp and --lora-rank cannot be combined (LoRA trains few parameters: use DDP)")
        self.out = Path(args.out)
        self.last = self.out / "checkpoint-last"
        self.resuming = (self.last / STATE_FILE).exists()
        self.sharded = args.fsdp and self.world > 1
        self.model = build_model(args)
        self.config = self.model.config
        self.tokenizer = self._load_tokenizer()
        self.step = 0
        self.curriculum_hops = args.chain_start_hops
        self.history: list[dict] = []
        self._blocks: torch.Tensor | None = None
        self._chain: ChainBatches | None = None
        state = self._load_state()
        self.model.to(self.device)
        # The optimizer is built after sharding: FSDP replaces the parameters with sharded ones.
        self.ddp = self._parallel()
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, args.weight_decay),
            lr=args.lr,
            betas=(0.9, 0.95),
            weight_decay=args.weight_decay,
        )
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, args.warmup, args.steps, min_lr_rate=args.min_lr_ratio
        )
        if state:
            self._restore(state)

    def _parallel(self) -> torch.nn.Module:
        """The module the training step calls: the model itself (one process), DDP, or the model sharded in place
        with FSDP2 (`--fsdp`): each prelude and coda block is a unit gathered for its own forward; the core blocks
        stay in the root unit, gathered once per forward and kept for every recurrence step."""
        module = StepwiseLoss(self.model, self.args.direct_readout_weight) if self.args.deep_supervision else self.model
        if self.world == 1:
            return module
        if not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        for block in (*self.model.transformer.prelude, *self.model.transformer.coda):
            fully_shard(block)
        fully_shard(self.model)
        return self.model

    def _load_tokenizer(self):
        source = self.args.tokenizer or self.args.model or (self.last if self.resuming else None)
        if source:
            return AutoTokenizer.from_pretrained(source)
        if self.args.data == "chain":
            return build_tokenizer()
        raise ValueError("text data needs a tokenizer: pass --tokenizer (a folder with tokenizer.json)")

    # ----- checkpoints -------------------------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        """Weights of OUT/checkpoint-last into the (not yet sharded) model; the trainer state for `_restore`."""
        if not self.resuming:
            return None
        state = torch.load(self.last / STATE_FILE, weights_only=False)
        weights = AutoModelForCausalLM.from_pretrained(self.last).state_dict()
        self.model.load_state_dict(weights, strict=False)
        return state

    def _restore(self, state: dict) -> None:
        optimizer = state["optimizer"]
        keys = [key for group in optimizer["param_groups"] for key in group["params"]]
        if keys and isinstance(keys[0], str):  # keyed by parameter name: any parallelism
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=options)
        elif self.sharded:
            raise ValueError(
                f"{self.last} keeps its optimizer state by parameter index (older format): resume "
                "it once without --fsdp, then FSDP can continue from the next checkpoint"
            )
        else:
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.curriculum_hops, self.history = state["step"], state["curriculum_hops"], state["history"]
        if self.rank == 0:
            print(f"resumed from {self.last} at step {self.step}")

    def _full_state(self) -> tuple[dict | None, dict]:
        """(model weights, or None for the model's own; optimizer state keyed by parameter name), unsharded, so that
        a checkpoint resumes under any parallelism. Under FSDP every rank must call this (it gathers the shards) and
        rank 0 receives the tensors."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.sharded:
            return get_state_dict(self.model, self.optimizer, options=options)
        return None, get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def save(self, name: str = "checkpoint-last") -> Path:
        """Atomically write model, tokenizer and trainer state to OUT/name (rank 0 writes; all ranks call it)."""
        final = self.out / name
        weights, optimizer = self._full_state()
        if self.rank != 0:
            return final
        tmp = self.out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model.merge_and_unload() if self.args.lora_rank and name == "final" else self.model
        model.save_pretrained(tmp, state_dict=weights)
        self.tokenizer.save_pretrained(tmp)
        torch.save(
            {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "curriculum_hops": self.curriculum_hops,
                "history": self.history,
                "args": asdict(self.args),
            },
            tmp / STATE_FILE,
        )
        old = self.out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ----- data and steps ----------------------------------------------------------------------------------------
    def _text_blocks(self) -> torch.Tensor:
        """The packed sequences of the text data (N, seq_len), read at first use."""
        if self._blocks is None:
            self._blocks = load_text_blocks(self.args, self.tokenizer)
        return self._blocks

    def global_batch(self) -> dict[str, torch.Tensor]:
        """The batch of the current step over all ranks; it depends only on (seed, step), so resuming and any
        number of ranks see the same data."""
        if self.args.data != "chain":
            return text_batch(self._text_blocks(), self.args.batch_size, self.args.seed, self.step)
        if self._chain is None:
            args = self.args
            self._chain = ChainBatches(self.tokenizer, args.seed, args.batch_size, options=args.chain_options())
        most = self._max_hops()
        if self.args.chain_frontier_weight == 1:  # uniform: the draws (and data) of runs from before the option
            self._chain.hops, self._chain.hop_weights = (0, most), None
        else:  # the newest hop count drawn `chain_frontier_weight` times as often as each easier one
            self._chain.hops, self._chain.hop_weights = None, [1.0] * most + [self.args.chain_frontier_weight]
        return self._chain.batch(self.step)

    def local_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch, on this rank's device."""
        return {k: v[self.rank :: self.world].to(self.device) for k, v in self.global_batch().items()}

    def _max_hops(self) -> int:
        """Most hops of the chain problems trained and evaluated on now (0 up to it)."""
        high = SPLITS["in-distribution"].hops[1]  # the spec's training range ends there
        return min(self.curriculum_hops, high) if self.args.chain_curriculum else high

    def _initial_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's rows of the global batch's random initial states, drawn from a generator seeded by the step,
        so that any number of ranks (and a resumed run) start from the same states, on any device."""
        base = causal_lm(self.model)
        rows, width = batch["input_ids"].shape[0] * self.world, batch["input_ids"].shape[1]
        with torch.random.fork_rng():
            torch.manual_seed(self.args.seed * 1_000_003 + self.step)
            zeros = torch.zeros(rows, width, self.config.hidden_size, dtype=base.dtype)
            states = base.transformer.initialize_state(zeros, self.config.init_scale)
        return states[self.rank :: self.world].to(self.device)

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """One optimizer step on this rank's slice; returns (global mean loss, tokens processed here)."""
        self.model.train()
        depth = sample_num_steps(
            self.args.mean_recurrence or self.config.mean_recurrence,
            self.config.mean_backprop_depth,
            torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.step),
        )
        batch = dict(batch)
        chase = batch.pop("chase_labels", None)
        per_step = {"step_input_ids": batch.pop("step_input_ids")} if "step_input_ids" in batch else {}
        if chase is not None and not self.args.deep_supervision:
            # --chain-paced: what a query is labelled with depends on the depth just drawn
            batch["labels"] = paced_labels(batch["labels"], chase, sum(depth))
        # Paced labels only replace the targets of supervised positions, so the count holds at every depth.
        total = (batch["labels"][:, 1:] != -100).sum()
        if self.world > 1:
            dist.all_reduce(total)
        inputs = dict(
            batch, num_steps=depth, input_states=self._initial_states(batch), num_items_in_batch=total.to(torch.float32)
        )
        deep = self.args.deep_supervision
        step_loss = self.ddp(**inputs, chase_labels=chase, **per_step) if deep else self.ddp(**inputs).loss
        # DDP averages gradients over ranks; the loss is a sum over this rank's tokens / global token count.
        (step_loss * self.world).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = step_loss.detach() * self.world
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return float(loss), int(batch["attention_mask"].sum())

    # ----- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        result: dict[str, dict | float]
        if self.args.data == "chain":
            result = {
                f"acc@{r}": evaluate_first_token(
                    self.model,
                    self.tokenizer,
                    "in-distribution",
                    self.args.eval_samples,
                    seed=10_000 + self.step,
                    num_steps=r,
                    max_hops=self._max_hops(),
                )
                for r in self.args.eval_steps
            }
        else:
            batch = text_batch(self._text_blocks(), self.args.batch_size, self.args.seed + 1, 0)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            result = {
                f"loss@{r}": float(self.model(**batch, num_steps=r, init_scale=0.0).loss) for r in self.args.eval_steps
            }
        self.model.train()
        return result

    def _maybe_advance_curriculum(self, result: dict) -> None:
        if self.args.data != "chain" or not self.args.chain_curriculum or self.curriculum_hops >= 6:
            return
        best = max(v["by_hops"].get(self.curriculum_hops, 0.0) for v in result.values())
        if best >= self.args.chain_advance_at:
            self.curriculum_hops += 1

    def run(self) -> Path:
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        log = None
        if self.rank == 0:
            # The checkpoint's history is the record up to its step: steps logged after it before a crash are redone,
            # so the log restarts from that history instead of appending a second copy of them.
            log = (self.out / "log.jsonl").open("w")
            log.writelines(json.dumps(record) + "\n" for record in self.history)
        bar = tqdm(total=args.steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True)
        started, tokens = time.time(), 0
        while self.step < args.steps:
            loss, n = self.train_step(self.local_batch())
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr")
            self.step += 1
            tokens += n * self.world
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                tok_s=f"{tokens / (time.time() - started):.0f}",
                hops=self.curriculum_hops if args.data == "chain" else None,
            )
            record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            if self.step % args.eval_every == 0 or self.step == args.steps:
                record["eval"] = self.evaluate()
                self._maybe_advance_curriculum(record["eval"])
                record["curriculum_hops"] = self.curriculum_hops
                if self.rank == 0:
                    bar.write(
                        json.dumps(
                            {
                                "step": self.step,
                                **{k: v["accuracy"] if isinstance(v, dict) else v for k, v in record["eval"].items()},
                            }
                        )
                    )
            self.history.append(record)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if self.step % args.save_every == 0:
                self.save()
        bar.close()
        self.save()
        return self.save("final")


def history_table(history: list[dict], window: int = 50) -> str:
    """Markdown table of a run's evaluations: step, curriculum hops, mean training loss over the `window` steps
    before, and each evaluated accuracy (chain) or loss (text), overall and by hop count."""
    losses = {record["step"]: record["loss"] for record in history}
    rows, header = [], None
    for record in history:
        if "eval" not in record:
            continue
        step = record["step"]
        recent = [losses[s] for s in range(step - window + 1, step + 1) if s in losses]
        cells = [str(step), str(record.get("curriculum_hops", "")), f"{sum(recent) / len(recent):.3f}"]
        names = list(record["eval"])
        for value in record["eval"].values():
            if isinstance(value, dict):
                by_hops = " ".join(f"{h}:{a:.2f}" for h, a in sorted(value["by_hops"].items(), key=lambda x: int(x[0])))
                cells.append(f"{value['accuracy']:.2f} ({by_hops})")
            else:
                cells.append(f"{value:.3f}")
        if header is None:
            header = ["step", "hops", "loss", *names]
            rows += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run(ns: argparse.Namespace) -> int:
    """Entry point of `recurrent-depth train`."""
    args = args_from_namespace(ns)
    final = Trainer(args).run()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved {final}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
