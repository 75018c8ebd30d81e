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

The output folder's files always describe one adapter: ``training_args.json`` and
``history.json`` are written in the same atomic folder write as the adapter's two files, at the
end of a run, so a crash or a full disk leaves the previous four or the new four. While a run
is under way its settings travel in its checkpoint (``state.json``), which is what ``--resume``
compares with the command. Every failure is one line on stderr naming the file and the cause.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from loracore.finetune_args import add_arguments
from loracore.atomic import DiskWriteError, cause, remove_folder, sha256_file
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


START_AGAIN = "start the run again with --overwrite"


# ---- arguments ----------------------------------------------------------------------------
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


def _dtype_name(choice: str, device: torch.device) -> str:
    """``--dtype`` for this process's ``device``: ``auto`` is the serving and notebook decision
    (:func:`loracore.models.resolve_device_dtype`), except where that is float16. Training
    in float16 needs a loss scaler (its gradients underflow to zero below 6e-8, and
    :func:`loracore.train.train_step` has no GradScaler), so a GPU without native bfloat16
    trains in float32, slower but exact. The device itself stays the process's own (the local
    rank's GPU under torchrun), so there is no ``--device``."""
    if choice != "auto":
        return choice
    from loracore.models import resolve_device_dtype

    _, dtype = resolve_device_dtype(device, "auto")
    return "float32" if dtype == torch.float16 else str(dtype).removeprefix("torch.")


def _settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = _dtype_name(args.dtype, device)
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
    above = next(p for p in out.absolute().parents if p.exists())  # the root always exists
    if not above.is_dir():
        raise FinetuneError(f"--out {out}: {above} is a file, not a folder; give a folder path")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if args.resume:
        resumed = _read_checkpoint(out)
        saved = resumed["state"].get("settings")
        if saved is None:  # a checkpoint written before the settings travelled in it
            saved = _read_json(out / ARGS_NAME)
        defaults = {"use_dora": False}  # runs saved before the option existed had none
        differ = [f"{k}: the checkpoint's run has {saved.get(k, defaults.get(k))!r}, this command "
                  f"{settings[k]!r}" for k in RUN_SETTINGS if saved.get(k, defaults.get(k)) != settings[k]]
        if differ:
            raise FinetuneError(f"--resume: {out} is a different run; resuming would not give "
                                f"its result. Settings that differ:\n  - " + "\n  - ".join(differ))
        return resumed
    if held and not args.overwrite:
        kind = ("an earlier run" if ARGS_NAME in held else "an unfinished run"
                if CHECKPOINT_NAME in held else "files that are not a loracore run")
        raise FinetuneError(f"--out {out} already holds {kind} ({', '.join(held[:5])}"
                            f"{' ...' if len(held) > 5 else ''}); pass --resume to continue it, "
                            f"--overwrite to replace it, or choose an empty folder")
    return None


def _read_checkpoint(out: Path) -> dict:
    """The checkpoint in ``out``, checked (:func:`loracore.checkpoint.read_checkpoint`: every
    file readable, plain tensors only, no NaN), or a :class:`FinetuneError` saying why not."""
    folder = out / CHECKPOINT_NAME
    if not folder.is_dir() and not any(out.glob(f".{CHECKPOINT_NAME}.loracore-*")):
        done = all((out / name).is_file() for name in (ARGS_NAME, "adapter_model.safetensors"))
        finished = " (the run there finished: its adapter is saved)" if done else ""
        raise FinetuneError(f"--resume: no checkpoint folder at {folder}, so no run to continue"
                            f"{finished}; checkpoints are written with --save-every")
    try:
        resumed = read_checkpoint(folder)
    except CheckpointError as exc:
        raise FinetuneError(f"--resume: {exc}; the checkpoint cannot be resumed: {START_AGAIN}") from None
    state = resumed["state"]
    if not (isinstance(state.get("step"), int) and isinstance(state.get("history"), dict)
            and isinstance(state.get("settings", {}), dict)):
        raise FinetuneError(f"--resume: {folder / 'state.json'} lacks the step, the history or the "
                            f"settings of a run; {START_AGAIN}")
    return resumed


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a :class:`FinetuneError` naming the file and the cause."""
    if not path.is_file():
        raise FinetuneError(f"--resume: {path.parent} holds no {path.name}, so no run to continue")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"--resume: {path} is not valid JSON ({exc}); {START_AGAIN}") from None
    if not isinstance(value, dict):
        raise FinetuneError(f"--resume: {path} does not hold the settings of a run; {START_AGAIN}")
    return value


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
        _check_resumed(resumed, named, args.out / CHECKPOINT_NAME, rank, world)
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(resumed["tensors"][name])
        try:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise FinetuneError(f"--resume: {args.out / CHECKPOINT_NAME / 'optimizer.pt'} does not "
                                f"fit this run's optimizer ({exc}); {START_AGAIN}") from None
        start_step, history = resumed["state"]["step"], resumed["state"]["history"]
        torch.set_rng_state(resumed["rng"][rank]["cpu"])
        if device.type == "cuda" and resumed["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(resumed["rng"][rank]["cuda"], device)
    elif main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        # --overwrite: the old run's checkpoint may not mix into this one. Its adapter, settings
        # and history stay together until the end of this run replaces all four at once.
        remove_folder(args.out / CHECKPOINT_NAME)

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
                             {"step": done, "next_example": done * args.grad_accum * args.batch_size,
                              "settings": settings},
                             world, device, main_process)
    history["seconds"] += time.perf_counter() - started
    model.eval()
    if eval_batches is not None:
        _evaluate(model, eval_batches, history, args.steps, main_process)
    if main_process:
        _finish(model, args, tokenizer, history, settings)
    if world > 1:
        dist.barrier()
    return history


def _check_resumed(resumed: dict, named: dict, folder: Path, rank: int, world: int) -> None:
    """The checkpoint's tensors are this model's trainable ones, and its RNG states this
    number of processes'."""
    have = resumed["tensors"]
    wrong = sorted(set(named) ^ set(have)) or [n for n in named if have[n].shape != named[n].shape]
    if wrong:
        raise FinetuneError(f"--resume: {folder / 'adapter.safetensors'} does not hold this run's "
                            f"adapter (first difference: {wrong[0]!r}); {START_AGAIN}")
    if len(resumed["rng"]) != world:
        raise FinetuneError(f"--resume: the checkpoint in {folder} was written by "
                            f"{len(resumed['rng'])} process(es), this run has {world}: resume "
                            f"with the same number (torchrun --nproc_per_node)")


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


def _finish(model, args: argparse.Namespace, tokenizer, history: dict, settings: dict) -> None:
    """The adapter, its settings and its history, in one atomic folder write; then the
    checkpoint goes (a crash between the two leaves a finished run and a checkpoint of it)."""
    from loracore.adapters import save_adapter

    history["tokens_per_second"] = history["tokens"] / history["seconds"] if history["seconds"] else None
    save_adapter(model, args.out, extra_files={ARGS_NAME: json.dumps(settings, indent=2) + "\n",
                                               HISTORY_NAME: json.dumps(history, indent=1) + "\n"})
    remove_folder(args.out / CHECKPOINT_NAME)  # the run is complete
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
    except OSError as exc:  # the disk or the file system refused: not the command's fault
        if int(os.environ.get("RANK", "0")) == 0:
            words = str(exc) if isinstance(exc, DiskWriteError) else f"{exc.filename}: {cause(exc)}"
            print(f"loracore finetune: error: {words}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
