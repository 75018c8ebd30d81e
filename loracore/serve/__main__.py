"""``python -m loracore.serve --model smollm2-135m --lora-modules capitals=PATH --port 8000``:
an OpenAI-compatible server with vLLM's flag names (``--lora-modules``, ``--max-loras``,
``--max-lora-rank``, ``--max-num-seqs``, ``--host``, ``--port``)."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    for spec in args.lora_modules:
        if "=" not in spec or not spec.split("=", 1)[0] or not spec.split("=", 1)[1]:
            p.error(f"--lora-modules: expected name=path, got {spec!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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

    model, tokenizer = load_base_model(args.model)
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
    print(f"loracore.serve: {base_name} with adapters {registry.names()} on http://{args.host}:{args.port}",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
