"""``python -m loracore.serve --model smollm2-135m --lora-modules capitals=PATH --port 8000``:
an OpenAI-compatible server with vLLM's flag names (``--lora-modules``, ``--max-loras``,
``--max-lora-rank``, ``--max-num-seqs``, ``--device``, ``--dtype``, ``--host``, ``--port``).

- ``--device {auto,cpu,cuda,cuda:N,mps}`` (default ``auto``: CUDA, else MPS, else the CPU) and
  ``--dtype {auto,float32,bfloat16,float16}`` (default ``auto``: bfloat16 on a GPU that computes
  it natively, float16 on an older GPU, float32 on MPS and the CPU) are decided by
  :func:`loracore.models.resolve_device_dtype`, as every notebook's ``pick_device()`` is. A
  device the machine does not have exits with status 2 and one line, before any model is loaded.
- The startup line names the model, the device, the dtype, the adapters and the address.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _device_name(text: str) -> str:
    from loracore.models import check_device_name

    try:
        return check_device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loracore.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="base model: tiny-qwen2, smollm2-135m or qwen2-0.5b")
    p.add_argument("--served-model-name", default=None, help="the base's name in requests (default: --model)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
                   help="adapters to load at start, as name=path")
    p.add_argument("--enable-lora", action="store_true", help="accepted for vLLM compatibility (always on)")
    p.add_argument("--max-loras", type=int, default=8, help="adapters resident at once (LRU beyond)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="highest adapter rank; slots are allocated at it")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    p.add_argument("--device", type=_device_name, default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                   help="where the model runs (default auto: CUDA, else MPS, else the CPU)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="the model's dtype (default auto: bfloat16 on a GPU that has it, float16 on "
                        "an older GPU, float32 on MPS and the CPU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    for spec in args.lora_modules:
        if "=" not in spec or not spec.split("=", 1)[0] or not spec.split("=", 1)[1]:
            p.error(f"--lora-modules: expected name=path, got {spec!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from loracore.models import resolve_device_dtype

    # The device is checked before anything is loaded: a missing GPU is one line, not a traceback
    # from deep inside the first forward pass.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            device, dtype = resolve_device_dtype(args.device, args.dtype, cli=True)
        except ValueError as e:
            print(f"loracore.serve: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"loracore.serve: warning: {w.message}", file=sys.stderr)
    from loracore.extras import MissingExtra, require_extra

    try:
        require_extra("serve", "python -m loracore.serve")
    except MissingExtra as e:
        print(f"loracore.serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from loracore.models import load_base_model, resolve_model_name
    from loracore.serve.engine import Engine
    from loracore.serve.registry import AdapterError, AdapterRegistry
    from loracore.serve.server import create_app

    model, tokenizer = load_base_model(args.model, dtype=dtype, device=device)
    base_name = args.served_model_name or args.model or resolve_model_name(None)[0]
    registry = AdapterRegistry(model, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                               base_name=base_name)
    for spec in args.lora_modules:
        name, path = spec.split("=", 1)
        try:
            registry.load(name, path)
        except AdapterError as e:
            print(f"loracore.serve: cannot load --lora-modules {spec}: {e}", file=sys.stderr)
            return 2
    engine = Engine(model, tokenizer, registry, max_num_seqs=args.max_num_seqs)
    app = create_app(engine, base_name)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"loracore.serve: {base_name} on {device} in {dtype_name} with adapters {registry.names()} "
          f"on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
