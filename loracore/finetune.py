"""``loracore finetune``: LoRA fine-tuning from the command line, on one device or many.

    loracore finetune --model smollm2-135m --data train.jsonl --eval test.jsonl --out runs/x \\
        --r 16 --lora-alpha 32 --steps 90 --batch-size 8 --lr 1e-3
    torchrun --nproc_per_node=2 -m loracore.finetune --rank 16 ...   # the same, two processes

(Under torchrun, write the rank as ``--rank``: torchrun's parser takes ``--r`` for one of its own.)

One optimizer step takes a *global batch* of ``--batch-size`` examples (``--grad-accum`` times
over) and is :func:`loracore.train.train_step`, the step of ``loracore.train.train``. Under
``torchrun`` every process takes its own rows of each global batch, and PyTorch's
DistributedDataParallel adds up the gradients of the trainable parameters, which after
``inject`` are only the adapter's. Each process scales its summed loss by
``world_size / answer tokens in the whole step``; DDP averages over the processes, so the
gradient is the single-process gradient of the global batch. That is why one process and N
give the same adapter (up to float rounding of the sums). What is this module's own: the
processes, the data order, checkpoints and the command line.

The data order is a function of ``--seed`` only (a seeded permutation per epoch), so a
checkpoint needs to remember just where the stream stands. Checkpoints (``--save-every``) are
written atomically (:mod:`loracore.checkpoint`), and ``--resume`` continues so that an
interrupted run ends with the same adapter, bit for bit on the CPU, as one never stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from loracore.argtypes import positive_float, positive_int
from loracore.atomic import atomic_write_text, sha256_file
from loracore.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from loracore.data import DataError, collate, load_chat_jsonl, pad_token_id, tokenize_chat
from loracore.train import lr_schedule, train_step

ARGS_NAME, HISTORY_NAME, CHECKPOINT_NAME = "training_args.json", "history.json", "checkpoint"
#: What a run's result depends on: a --resume must agree on every one of these.
RUN_SETTINGS = ("model", "data_sha256", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora",
                "target_modules", "steps", "batch_size", "grad_accum", "lr", "weight_decay",
                "warmup_steps", "schedule", "max_grad_norm", "max_length", "qlora", "seed", "dtype")
OUR_FILES = {ARGS_NAME, HISTORY_NAME, CHECKPOINT_NAME, "adapter_model.safetensors",
             "adapter_config.json"}


class FinetuneError(ValueError):
    """A problem with the command's input; the message says what and how to fix it."""


# ---- arguments ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's options (shared by ``loracore finetune`` and ``python -m loracore.finetune``)."""
    a = parser.add_argument
    a("--model", required=True, help="a course model (smollm2-135m, qwen2-0.5b, tiny-qwen2) "
      "or a local Hugging Face model folder")
    a("--data", required=True, type=Path, help="training conversations, chat-format JSONL")
    a("--eval", type=Path, help="held-out conversations, chat-format JSONL")
    a("--out", required=True, type=Path, help="output folder (adapter, args, history, checkpoint)")
    # --rank and --lora-r are the same option: under torchrun, spell it one of those, because
    # torchrun's own parser reads "--r" as an abbreviation of its --rdzv-*/--role options.
    a("--r", "--rank", "--lora-r", dest="r", type=positive_int, default=16,
      help="LoRA rank (default 16); --rank under torchrun")
    a("--lora-alpha", type=positive_float, default=32.0, help="LoRA alpha (default 32)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input (default 0)")
    a("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    a("--use-dora", action="store_true",
      help="DoRA (Liu et al. 2024): a trained magnitude per output feature on top of LoRA "
           "(PEFT's use_dora; vLLM does not serve DoRA adapters: merge them first)")
    a("--target-modules", default="all-linear",
      help="'all-linear' or comma-separated layer names such as q_proj,v_proj")
    a("--steps", type=positive_int, required=True, help="optimizer steps")
    a("--batch-size", type=positive_int, default=8, help="global batch: examples per step "
      "per accumulation round, split over the processes (default 8)")
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    a("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    a("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    a("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    a("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping norm")
    a("--max-length", type=positive_int, default=256, help="longest example in tokens")
    a("--qlora", action="store_true", help="quantize the base to NF4 first (QLoRA)")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="base model dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    a("--seed", type=int, default=0, help="seeds the adapter's init and the data order")
    a("--save-every", type=positive_int, help="write a checkpoint every N steps")
    a("--eval-every", type=positive_int, help="evaluate on --eval every N steps")
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--overwrite", action="store_true", help="replace what --out holds")
    a("--no-progress", action="store_true", help="no progress bar")
    return parser


# ---- the processes ------------------------------------------------------------------------
def _setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: one process group, gloo on CPUs and NCCL on
    GPUs (chosen here, not by the user); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    targets = args.target_modules if args.target_modules == "all-linear" else sorted(
        t.strip() for t in args.target_modules.split(",") if t.strip())
    return {"model": args.model, "data": str(args.data), "data_sha256": sha256_file(args.data),
            "eval": str(args.eval) if args.eval else None, "r": args.r,
            "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "use_rslora": args.use_rslora, "use_dora": args.use_dora, "target_modules": targets,
            "steps": args.steps,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
            "schedule": args.schedule, "max_grad_norm": args.max_grad_norm,
            "max_length": args.max_length, "qlora": args.qlora, "seed": args.seed, "dtype": dtype}


def _check_args(args: argparse.Namespace, world: int) -> None:
    """Everything that can be refused before a model is loaded."""
    for what, path in (("--data", args.data), ("--eval", args.eval)):
        if path is not None and not path.is_file():
            raise FinetuneError(f"{what}: no such file: {path}")
    if args.batch_size % world:
        raise FinetuneError(f"--batch-size {args.batch_size} is not divisible by the {world} "
                            f"processes: each process takes batch_size / world_size rows of every "
                            f"global batch. Use a multiple of {world}")
    if not 0 <= args.lora_dropout < 1:
        raise FinetuneError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if not 0 <= args.warmup_steps <= args.steps:
        raise FinetuneError(f"--warmup-steps must be between 0 and --steps ({args.steps}), "
                            f"got {args.warmup_steps}")
    if args.resume and args.overwrite:
        raise FinetuneError("--resume continues what --out holds and --overwrite replaces it: "
                            "pass one of them")


def _check_out(args: argparse.Namespace, settings: dict[str, Any]) -> dict | None:
    """Refuse an output folder that holds something else; on --resume return the checkpoint."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; give a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if args.resume:
        if not (out / ARGS_NAME).is_file():
            raise FinetuneError(f"--resume: {out} holds no {ARGS_NAME}, so no run to continue")
        saved = json.loads((out / ARGS_NAME).read_text())
        defaults = {"use_dora": False}  # runs saved before the option existed had none
        differ = [f"{k}: the checkpoint's run has {saved.get(k, defaults.get(k))!r}, this command "
                  f"{settings[k]!r}" for k in RUN_SETTINGS if saved.get(k, defaults.get(k)) != settings[k]]
        if differ:
            raise FinetuneError(f"--resume: {out} is a different run; resuming would not give "
                                f"its result. Settings that differ:\n  - " + "\n  - ".join(differ))
        try:
            return read_checkpoint(out / CHECKPOINT_NAME)
        except CheckpointError as exc:
            raise FinetuneError(f"--resume: {exc}") from None
    if held and not args.overwrite:
        kind = "an earlier run" if ARGS_NAME in held else "files that are not a loracore run"
        raise FinetuneError(f"--out {out} already holds {kind} ({', '.join(held[:5])}"
                            f"{' ...' if len(held) > 5 else ''}); pass --resume to continue it, "
                            f"--overwrite to replace it, or choose an empty folder")
    return None


# ---- model and data -----------------------------------------------------------------------
def _load_model(args: argparse.Namespace, settings: dict, device: torch.device, verbose: bool):
    from loracore.models import KNOWN_MODELS, load_base_model
    from loracore.surgery import inject

    dtype = getattr(torch, settings["dtype"])
    if args.model.lower() in KNOWN_MODELS:
        model, tokenizer = load_base_model(args.model, dtype=dtype, verbose=verbose)
    elif Path(args.model).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        raise FinetuneError(f"--model {args.model!r} is neither a course model "
                            f"({', '.join(KNOWN_MODELS)}) nor a local model folder")
    if args.qlora:
        from loracore.qlora import quantize_model
        quantize_model(model)
    torch.manual_seed(args.seed)  # the adapter's init: the same on every process
    inject(model, settings["target_modules"], r=args.r, lora_alpha=args.lora_alpha,
           lora_dropout=args.lora_dropout, use_rslora=args.use_rslora, use_dora=args.use_dora)
    return model.to(device), tokenizer


class DataStream:
    """The training examples in a seeded order, epoch after epoch, as global batches.

    Position ``p`` of the stream is example ``perm(p // n)[p % n]``, where ``perm(e)`` is a
    permutation drawn from a generator seeded with ``(seed, e)``. A batch is a slice of
    positions, so the order never depends on how many batches were drawn before, by whom.
    """

    def __init__(self, examples: list[dict], seed: int) -> None:
        self.examples, self.seed, self._perms = examples, seed, {}

    def _example(self, position: int) -> dict:
        epoch, i = divmod(position, len(self.examples))
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # keep one epoch's permutation: the stream only moves forward
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self.examples[self._perms[epoch][i]]

    def batch(self, start: int, size: int) -> list[dict]:
        """Examples at positions ``start .. start + size - 1``."""
        return [self._example(p) for p in range(start, start + size)]


# ---- the run ------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as ``args`` say; returns the history (also written to ``--out``)."""
    rank, world, device = _setup_distributed()
    main_process = rank == 0
    _check_args(args, world)
    settings = _settings(args, device)
    resumed = _check_out(args, settings)
    # Read and check the data files first: a broken line fails before a model is loaded.
    train_set = load_chat_jsonl(args.data)
    eval_set = load_chat_jsonl(args.eval) if args.eval is not None else None
    model, tokenizer = _load_model(args, settings, device, verbose=main_process)
    examples = _tokenize(train_set, tokenizer, args.max_length)
    eval_batches = None
    if eval_set is not None:
        held_out = _tokenize(eval_set, tokenizer, args.max_length)
        eval_batches = [collate(held_out[i:i + 8], pad_token_id(tokenizer))
                        for i in range(0, len(held_out), 8)]

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = lr_schedule(optimizer, num_steps=args.steps, warmup_steps=args.warmup_steps,
                            kind=args.schedule)
    history: dict[str, Any] = {"loss": [], "lr": [], "eval": [], "tokens": 0, "seconds": 0.0}
    start_step = 0
    torch.manual_seed(args.seed * 1_000 + rank)  # dropout masks: different on every process
    if resumed is not None:
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(resumed["tensors"][name])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start_step, history = resumed["state"]["step"], resumed["state"]["history"]
        torch.set_rng_state(resumed["rng"][rank]["cpu"])
        if device.type == "cuda" and resumed["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(resumed["rng"][rank]["cuda"], device)
    elif main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        # --overwrite: no checkpoint or history of the old run may mix into this one
        shutil.rmtree(args.out / CHECKPOINT_NAME, ignore_errors=True)
        (args.out / HISTORY_NAME).unlink(missing_ok=True)
        atomic_write_text(args.out / ARGS_NAME, json.dumps(settings, indent=2) + "\n")

    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world > 1 else model)
    stream, pad_id = DataStream(examples, args.seed), pad_token_id(tokenizer)
    rows = args.batch_size // world
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
               desc="finetune", disable=args.no_progress or not main_process)
    started = time.perf_counter()
    model.train()
    for step in bar:
        # Every process collates the whole global batch (the same padding everywhere), then
        # keeps its own rows; the step counts the answer tokens of all processes' rows.
        micro = [collate(stream.batch((step * args.grad_accum + k) * args.batch_size,
                                      args.batch_size), pad_id) for k in range(args.grad_accum)]
        mine = [{key: v[rank * rows:(rank + 1) * rows].to(device) for key, v in batch.items()}
                for batch in micro]
        loss, lr = train_step(ddp, mine, optimizer, scheduler, max_grad_norm=args.max_grad_norm,
                              where=f"finetune: step {step}")
        history["tokens"] += sum(int(b["attention_mask"].sum()) for b in micro)  # global batches'
        history["lr"].append(lr)
        history["loss"].append(loss)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
        done = step + 1
        if eval_batches is not None and args.eval_every and done % args.eval_every == 0 and done < args.steps:
            _evaluate(model, eval_batches, history, done, main_process)
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            history["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            _save_checkpoint(args.out / CHECKPOINT_NAME, named, optimizer, scheduler, history,
                             {"step": done, "next_example": done * args.grad_accum * args.batch_size},
                             world, device, main_process)
    history["seconds"] += time.perf_counter() - started
    model.eval()
    if eval_batches is not None:
        _evaluate(model, eval_batches, history, args.steps, main_process)
    if main_process:
        _finish(model, args, tokenizer, history)
    if world > 1:
        dist.barrier()
    return history


def _tokenize(dataset, tokenizer, max_length: int) -> list[dict]:
    tokens = tokenize_chat(dataset, tokenizer, max_length=max_length)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(tokens["input_ids"], tokens["labels"])]


def _evaluate(model, batches, history: dict, step: int, main_process: bool) -> None:
    """Held-out answer loss (the main process only; the others go on to the next step and
    wait for it at the next gradient all-reduce)."""
    from loracore.evaluate import answer_loss

    if main_process:
        was_training = model.training
        model.eval()  # no dropout while measuring
        loss = answer_loss(model, batches)
        model.train(was_training)
        history["eval"].append({"step": step, "loss": loss})
        tqdm.write(f"step {step}: held-out answer loss {loss:.4f}")


def _save_checkpoint(folder: Path, named: dict, optimizer, scheduler, history: dict,
                     position: dict, world: int, device: torch.device, main_process: bool) -> None:
    """Every process hands its RNG state to the main process, which writes the checkpoint."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    states = [mine]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, mine)
    if main_process:
        write_checkpoint(folder, tensors=named, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(),
                         state={**position, "history": history},
                         rng=states)


def _finish(model, args: argparse.Namespace, tokenizer, history: dict) -> None:
    from loracore.adapters import save_adapter

    history["tokens_per_second"] = history["tokens"] / history["seconds"] if history["seconds"] else None
    save_adapter(model, args.out)
    atomic_write_text(args.out / HISTORY_NAME, json.dumps(history, indent=1) + "\n")
    shutil.rmtree(args.out / CHECKPOINT_NAME, ignore_errors=True)  # the run is complete
    final = f"final train loss {history['loss'][-1]:.4f}"
    if history["eval"]:
        final += f", held-out answer loss {history['eval'][-1]['loss']:.4f}"
    print(f"loracore finetune: {args.steps} steps in {history['seconds']:.1f} s "
          f"({history['tokens_per_second']:.0f} tokens/s); {final}. Adapter saved to {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m loracore.finetune``; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="loracore finetune", description=__doc__.split("\n")[0].strip("`: ")))
    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run, turning a refusal into one line on stderr (from rank 0 only) and exit status 2."""
    try:
        run(args)
    except (FinetuneError, DataError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"loracore finetune: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
