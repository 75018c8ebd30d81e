"""The base model an adapter belongs to: a fingerprint of it, and a record of mismatches.

An adapter is a correction to one exact set of base weights (lesson 10, "An adapter belongs to its
base model"). :func:`base_fingerprint` condenses what an adapter depends on into a small dict that
:func:`loracore.adapters.save_adapter` stores in the weights file's header;
:func:`compare_fingerprints` says in words what differs when the adapter is loaded again; and
:func:`foreign_adapters` lists the adapters that were loaded anyway (``strict=False``) onto a base
that is not theirs, so that operations mixing adapters can refuse them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from loracore.layer import LoRALinear, is_float_linear

__all__ = ["base_fingerprint", "compare_fingerprints", "foreign_adapters", "record_foreign",
           "forget_foreign"]

#: attribute (in the model's ``__dict__``) recording adapters loaded onto a base that is not theirs
#: (:mod:`loracore.surgery` clears it through :func:`forget_foreign` when adapters go away)
_FOREIGN = "_loracore_foreign_adapters"


def foreign_adapters(model: nn.Module) -> dict[str, list[str]]:
    """Adapters that :func:`loracore.adapters.load_adapter` loaded with ``strict=False`` onto a
    base their file's fingerprint does not match: ``{adapter name: [what differs, ...]}`` (empty
    when none).

    Adapters made in memory (:func:`~loracore.surgery.inject`) or loaded onto their own base are
    not listed. Operations that mix adapters (:func:`loracore.combine.combine_adapters`) use it
    to refuse combining task vectors that were learned against different weights."""
    record = model.__dict__.get(_FOREIGN, {})
    present = {a for layer in model.modules() if isinstance(layer, LoRALinear) for a in layer.lora_A}
    return {name: list(problems) for name, problems in record.items() if name in present}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, whatever its dtype or device."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def base_fingerprint(model: nn.Module, module_names: list[str]) -> dict:
    """What an adapter depends on: the model class, each target's ``[out, in]``, and a
    SHA-256 of the targeted base weights.

    ``weights_sha256`` (every target a float ``nn.Linear``, else ``None``) is taken on the
    weights rounded to bfloat16, so an adapter saved on a float32 base also matches the same
    base loaded in bfloat16. ``quantized_sha256`` (every target quantized, e.g. ``Linear4bit``,
    else ``None``) is taken on the stored tensors themselves (packed codes and constants): the
    same checkpoint quantized with the same settings gives the same bytes on any device. A
    4-bit base and its float original are not compared by hash (shapes only), so a QLoRA
    adapter can still be loaded onto the float base, for example to merge it.
    """
    float_digest, quant_digest = hashlib.sha256(), hashlib.sha256()
    kinds = set()
    targets = {}
    for name in sorted(module_names):
        layer = model.get_submodule(name)
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        if isinstance(layer, LoRALinear) and layer.merged:
            raise ValueError(f"module {name!r} has merged adapters {layer.merged_adapters}; "
                             f"unmerge() first, so the base weights can be fingerprinted")
        targets[name] = [base.out_features, base.in_features]
        if is_float_linear(base):
            kinds.add("float")
            float_digest.update(name.encode() + b"\0")
            float_digest.update(_tensor_bytes(base.weight.to(torch.bfloat16)))
        else:
            kinds.add("quantized")
            for key, t in sorted(base.state_dict().items()):
                if key == "bias":
                    continue
                quant_digest.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode() + b"\0")
                quant_digest.update(_tensor_bytes(t))
    return {"architecture": type(model).__name__, "targets": targets,
            "weights_sha256": float_digest.hexdigest() if kinds == {"float"} else None,
            "quantized_sha256": quant_digest.hexdigest() if kinds == {"quantized"} else None}


def compare_fingerprints(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they agree)."""
    problems = []
    if saved.get("architecture") != current["architecture"]:
        problems.append(f"architecture: adapter was trained on {saved.get('architecture')}, "
                        f"this model is {current['architecture']}")
    for name, shape in saved.get("targets", {}).items():
        if name in current["targets"] and list(shape) != current["targets"][name]:
            problems.append(f"module {name!r}: base layer was [out, in] = {list(shape)}, "
                            f"here it is {current['targets'][name]}")
    a, b = saved.get("weights_sha256"), current["weights_sha256"]
    if not problems and a is not None and b is not None and a != b:
        problems.append("base weights: the targeted weights hash differently (same shapes, "
                        "different values: another checkpoint or a fine-tuned variant)")
    a, b = saved.get("quantized_sha256"), current["quantized_sha256"]
    if not problems and a is not None and b is not None and a != b:
        problems.append("base weights: the quantized weights hash differently (same shapes, "
                        "different bytes: another checkpoint, or quantized with other settings "
                        "such as the blocksize or double quantization)")
    return problems


def record_foreign(model: nn.Module, adapter_name: str, problems: list[str]) -> None:
    """Note that adapter ``adapter_name`` of ``model`` was loaded onto a base its fingerprint does
    not match (``problems``: what differs), or forget an earlier note when ``problems`` is empty."""
    record = model.__dict__.setdefault(_FOREIGN, {})
    record.pop(adapter_name, None)
    if problems:
        record[adapter_name] = list(problems)



def forget_foreign(model: nn.Module, adapter_name: str | None = None) -> None:
    """Forget what :func:`record_foreign` noted about adapter ``adapter_name`` of ``model``
    (about every adapter when ``None``): the adapter was deleted, or all LoRA was removed."""
    if adapter_name is None:
        model.__dict__.pop(_FOREIGN, None)
    else:
        model.__dict__.get(_FOREIGN, {}).pop(adapter_name, None)
