"""loracore: LoRA, QLoRA, adapter merging and multi-adapter serving, built from scratch.

The modules in the order the course teaches them (the lesson that meets each, in brackets):

- ``notebook``: the short mode, seeding and timing that every notebook uses [00];
- ``env``: the environment check lesson 00 runs, one OK or FAIL per package [00];
- ``models``: which base model, on which device, and the tiny test model [00];
- ``model_cache``: the offline model converted once to a safetensors cache, crash-safe [00];
- ``layer``: the LoRA layer ``LoRALinear`` and its math as pure functions [01-02];
- ``surgery``: LoRA layers put into a whole model, and the operations on all of them [03];
- ``lora``: ``layer`` and ``surgery`` in one import [01-03];
- ``adapter_file``: the adapter file format (PEFT's) and its pure, checking reader [03];
- ``adapters``: adapters saved, and loaded into a model (read, check the base, apply) [03];
- ``fingerprint``: the base model an adapter belongs to, and mismatches on load [03];
- ``memory``: training memory by arithmetic, for 7B and 70B, full, LoRA and QLoRA, on
  one GPU or sharded [03, 07, 11];
- ``data``: chat-format JSONL to padded training batches [04];
- ``train``: the training loop and its one step; LoRA+ parameter groups [04];
- ``dora``: DoRA's magnitude and direction, as pure functions [04];
- ``evaluate``: accuracy by generation on held-out questions, and perplexity [04, 10];
- ``nf4``: 4-bit NormalFloat quantization, byte for byte as bitsandbytes [05];
- ``quant8``: 8-bit blockwise quantization, under NF4's double quantization and 8-bit
  optimizer state [05, 07];
- ``lora_init``: PiSSA and LoftQ, LoRA started from the base weight's structure [06];
- ``qlora``: a frozen NF4 base model with LoRA adapters on top [06];
- ``paging``: a pool of fixed-size pages in two memory tiers [07];
- ``optim``: paged and 8-bit AdamW, on ``paging`` and ``quant8`` [07];
- ``merge``: task arithmetic, TIES and DARE, as pure functions on tensors [08];
- ``combine``: a model's adapters combined into one new adapter [08];
- ``merged``: a model with its adapters merged in, saved as a plain transformers folder;
- ``extract``: an adapter extracted from two models' weight difference by truncated SVD;
- ``serve``: many adapters on one base: registry, mixed batches, engine, decoder, HTTP server [09];
- ``checkpoint``: training checkpoints that resume to the same result bit for bit [11];
- ``finetune``: ``loracore finetune``, on one device or many [11];
- ``gguf_export``: ``loracore export gguf``, an adapter as llama.cpp's GGUF LoRA file and an
  Ollama Modelfile [12];
- ``gguf_base``: the base model and its tokenizer as a GGUF file for llama.cpp [12].

Around the lessons:

- ``selfcheck`` and ``checks``: the labs' exercise checks and their friendly failures;
- ``grade``: ``loracore grade``, learners' lab notebooks graded in bulk, sandboxed;
- ``cli`` and ``__main__``: the ``loracore`` command and its subcommands;
- ``export``: ``loracore export``, an adapter turned into what another program runs;
- ``atomic``: crash-safe writes, a file or a folder replaced completely or not at all;
- ``argtypes``: the command line's positive numbers (finite, above zero) and lab names;
- ``finetune_args``: ``loracore finetune``'s options, readable without torch;
- ``bench``: medians of repeated timings, one JSON result per benchmark;
- ``extras``: the pip extra each optional command needs (``serve``, ``grade``);
- ``_quiet``: silences one offline log notice of bitsandbytes; installed on import.
"""

__version__ = "0.1.0"

from loracore import _quiet

_quiet.install()


def hint(lab: str, exercise: str, n: int | None = None) -> None:
    """Print the next hint for one of a lab's exercises: ``loracore.hint("lab02", "training_step")``.

    The same hints, and the same count, as ``loracore.checks.labNN.hint(exercise)``; ``n`` shows
    hint ``n`` again. See :class:`loracore.selfcheck.Hints`.
    """
    import importlib

    from loracore.argtypes import lab_number_or_none

    number = lab_number_or_none(lab)
    if number is None:
        raise ValueError(f"loracore.hint: {lab!r} is not a lab; give it as \"lab02\" or 2")
    name = f"loracore.checks.lab{number}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ValueError(f"loracore.hint: there is no lab {number} with hints") from None
    module.hint(exercise, n)
