"""Model surgery: putting LoRA layers into a whole model, and the operations on all of them.

:func:`inject` finds a model's linear layers by name and wraps each in a
:class:`~loracore.layer.LoRALinear` in place (:func:`inject_modules` takes the exact full
names instead, as :func:`~loracore.adapters.load_adapter` knows them); the other functions act on every LoRA layer of
the model at once (activate, disable, merge, unmerge, delete an adapter, unwrap everything).
The layer itself, and the math, live in :mod:`loracore.layer`.

Every operation here is all-or-nothing: it checks all its arguments and targets before it
changes anything, and runs inside :func:`all_or_nothing`, which puts the model back exactly as
it was (same modules in the same places, same ``requires_grad`` flags, same weights bit for
bit, same active and merged adapters) if something still fails half-way.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from loracore.fingerprint import base_fingerprint, forget_foreign
from loracore.layer import LoRALinear, check_adapter_args, is_float_linear, is_linear
from loracore.lora_init import INIT_NAMES, loftq_init, pissa_init
from loracore.nf4 import dequantize_nf4

__all__ = [
    "inject", "inject_modules", "target_names", "lora_layers", "linear_layer_names",
    "trainable_parameters", "set_adapter",
    "disable_adapters", "merge_adapters", "unmerge_adapters", "delete_adapter", "remove_lora",
    "all_or_nothing", "replace_module", "changed_bases",
]

#: attribute (in the model's ``__dict__``) recording adapters whose initialisation changed the
#: base weights (PiSSA, LoftQ): see :func:`changed_bases`
_CHANGED = "_loracore_changed_bases"


# ---- all-or-nothing -----------------------------------------------------------------------
class _Snapshot:
    """What a model operation may change, held by reference (no weight is copied): each
    module's children and parameter objects (an initialisation that changes a base weight puts
    a new ``Parameter`` in its place, never writes into the old one), each parameter's
    ``requires_grad``, each LoRA layer's adapter bookkeeping and merge state, and the records
    :func:`inject` keeps (``requires_grad`` flags, changed bases).
    Merged weights are restored exactly because a merged weight is a pure function of the
    original weight the layer keeps and of the merged adapters' names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        modules = list(model.modules())
        self.children = [(m, dict(m._modules)) for m in modules]
        self.params = [(m, dict(m._parameters)) for m in modules]
        self.flags = [(p, p.requires_grad) for m in modules for p in m._parameters.values()
                      if p is not None]
        self.layers = [(m, {k: dict(getattr(m, k)) for k in ("r", "lora_alpha", "scaling", "use_rslora")},
                        list(m.active_adapters), list(m.merged_adapters), m.disabled, m._unmerged_weight)
                       for m in modules if isinstance(m, LoRALinear)]
        self.record = model.__dict__.get("_loracore_requires_grad")
        self.changed = dict(model.__dict__.get(_CHANGED, {}))

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module, params in self.params:
            module._parameters.clear()
            module._parameters.update(params)
        for layer, dicts, active, merged, disabled, original in self.layers:
            for key, value in dicts.items():
                setattr(layer, key, value)
            layer.active_adapters, layer.disabled = active, disabled
            layer._restore_merge_state(merged, original)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.__dict__.pop("_loracore_requires_grad", None)
        if self.record is not None:
            self.model._loracore_requires_grad = self.record
        self.model.__dict__.pop(_CHANGED, None)
        if self.changed:
            self.model.__dict__[_CHANGED] = self.changed


@contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Run the block as one step on ``model``: if it raises (anything, KeyboardInterrupt
    included), the model is put back exactly as it was on entry, then the error propagates."""
    snapshot = _Snapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (never a LoRA target under "all-linear", as in PEFT)."""
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers LoRA could target (inside LoRALinear: the layer itself)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names.append(name)
        elif is_linear(module) and not _inside_lora(name, model):
            names.append(name)
    return names


def _inside_lora(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRALinear):
            return True
    return False


def _check_targets(target_modules: object, where: str = "inject") -> list[str] | str:
    """``target_modules`` as inject() reads it, or a clear error naming the fix."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError(f'{where}: target_modules is an empty string; pass layer names such as '
                             '["q_proj", "v_proj"], "all-linear", or a regex over full names')
        if target_modules != "all-linear":
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"{where}: target_modules {target_modules!r} is not a valid regular "
                                 f"expression ({e}). A single string is a regex over full module "
                                 f"names; for layer names pass a list such as ['q_proj']") from None
        return target_modules
    if not isinstance(target_modules, (list, tuple, set)):
        raise TypeError(f"{where}: target_modules must be a list of layer names such as "
                        f'["q_proj", "v_proj"], "all-linear", or a regex string; got '
                        f"{type(target_modules).__name__} {target_modules!r}")
    if not target_modules:
        raise ValueError(f"{where}: target_modules is empty; pass layer names such as "
                         '["q_proj", "v_proj"] or "all-linear"')
    bad = [t for t in target_modules if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"{where}: every entry of target_modules must be a non-empty layer name "
                        f"string; got {bad}")
    return list(target_modules)


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):  # as in PEFT: one string is a regex over the full name
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, target_modules: list[str] | str, r: int, lora_alpha: float, *,
           lora_dropout: float = 0.0, adapter_name: str = "default",
           use_rslora: bool = False, use_dora: bool = False,
           init_lora_weights: bool | str = True, loftq_config: object = None) -> nn.Module:
    """Wrap matching linear layers of ``model`` in :class:`LoRALinear`, in place.

    ``target_modules``: layer names matched against the end of each module's full name
    (``["q_proj", "v_proj"]``), ``"all-linear"`` (every linear layer except the output head),
    or one regex string matched against full names. Every base parameter is frozen; only the
    new adapter's parameters are trainable. A layer that is already a ``LoRALinear`` gets
    the new adapter added. ``use_dora=True`` makes it a DoRA adapter (a trainable magnitude per
    output feature too, see :mod:`loracore.dora`; float or 4-bit bases). All or nothing: a
    refusal leaves the model as it was. Returns ``model``.

    ``init_lora_weights`` (PEFT's name): ``True`` (A Kaiming-uniform, B zeros: the model starts
    as the base), ``"pissa"`` (or ``"pissa_niter_K"``, by randomized SVD) or ``"loftq"``
    (:mod:`loracore.lora_init`), which start from a non-zero ``B·A`` and **change the targeted
    base weights**: PiSSA to the residual ``W - scaling·B·A``, LoftQ to the float values of an
    NF4 weight (blocksize 64, no double quantization, as PEFT; saved with
    ``changed_base_ok=True``, then ``remove_lora`` and ``quantize_model(model,
    double_quant=False)``, the base stores exactly that NF4 weight and the adapter loads back
    onto it). ``loftq_config``: ``{"loftq_bits": 4, "loftq_iter": n}`` or PEFT's
    ``LoftQConfig`` (default one iteration). Both need float ``nn.Linear`` bases that carry no other adapter
    and no tied weight, and plain LoRA (no DoRA). The adapter is valid only on the changed base:
    :func:`changed_bases` records it, and :func:`loracore.adapters.save_adapter` refuses to save
    it unless told what to write (``convert_to_lora=True`` for PiSSA, ``changed_base_ok=True``).
    :func:`remove_lora` leaves the changed base in place (as PEFT's ``unload``).
    """
    if not isinstance(use_dora, bool):
        raise TypeError(f"inject: use_dora must be True or False, got {use_dora!r}")
    target_modules = _check_targets(target_modules)
    check_adapter_args("inject", adapter_name, r, lora_alpha, lora_dropout)
    init = _check_init(init_lora_weights, loftq_config, use_dora)
    chosen = target_names(model, target_modules)
    return _wrap(model, chosen, r, lora_alpha, lora_dropout, adapter_name, use_rslora, use_dora,
                 "inject", init)


def _check_init(init_lora_weights: object, loftq_config: object, use_dora: bool) -> dict | None:
    """``None`` for plain LoRA, else ``{"init": "pissa"}`` (with ``"niter"`` for the randomized
    SVD) or ``{"init": "loftq", "loftq_iter": n}``; a clear error for anything else."""
    niter = (re.fullmatch(r"pissa_niter_(\d+)", init_lora_weights)
             if isinstance(init_lora_weights, str) else None)
    if not niter and not any(init_lora_weights is v or (isinstance(init_lora_weights, str)
                                                        and init_lora_weights == v) for v in INIT_NAMES):
        raise ValueError(f"inject: init_lora_weights={init_lora_weights!r} is not one loracore "
                         f"knows; pass one of {list(INIT_NAMES)} or 'pissa_niter_K' (K >= 0 power "
                         f"iterations of a randomized SVD) (True: B = 0, the model starts as its base)")
    if loftq_config is not None and init_lora_weights != "loftq":
        raise ValueError(f"inject: loftq_config is given but init_lora_weights is "
                         f"{init_lora_weights!r}; pass init_lora_weights='loftq' or drop loftq_config")
    if init_lora_weights is True:
        return None
    if use_dora:
        raise ValueError(f"inject: init_lora_weights={init_lora_weights!r} with use_dora=True is not "
                         f"supported: DoRA's magnitude is taken from the base weight, which "
                         f"{init_lora_weights} changes; use one or the other")
    if niter:
        return {"init": "pissa", "niter": int(niter.group(1))}
    if init_lora_weights == "pissa":
        return {"init": "pissa"}
    config = {"loftq_bits": 4, "loftq_iter": 1}
    if loftq_config is not None:
        given = loftq_config if isinstance(loftq_config, dict) else getattr(loftq_config, "__dict__", None)
        if not isinstance(given, dict):
            raise TypeError(f"inject: loftq_config must be a dict such as {config} or PEFT's "
                            f"LoftQConfig, got {type(loftq_config).__name__}")
        unknown = sorted(set(given) - set(config))
        if unknown:
            raise ValueError(f"inject: loftq_config has unknown keys {unknown}; it takes {sorted(config)}")
        config.update(given)
    if config["loftq_bits"] != 4:
        raise ValueError(f"inject: loftq_config loftq_bits={config['loftq_bits']!r}: loracore's LoftQ "
                         f"quantizes to NF4 (4 bits) only")
    n = config["loftq_iter"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"inject: loftq_config loftq_iter must be an int >= 1, got {n!r}")
    return {"init": "loftq", "loftq_iter": n}


def target_names(model: nn.Module, target_modules: list[str] | str,
                 where: str = "inject") -> list[str]:
    """Full names of the linear layers of ``model`` that ``target_modules`` picks, as
    :func:`inject` reads it (layer names, ``"all-linear"``, or one regex over full names); a
    ``ValueError`` naming ``where`` when it picks none. The model is not changed."""
    target_modules = _check_targets(target_modules, where)
    candidates = linear_layer_names(model)
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n in candidates if n not in heads]
    else:
        chosen = [n for n in candidates if _matches(n, target_modules)]
    if not chosen:
        hint = ""
        if isinstance(target_modules, str) and re.fullmatch(r"\w+", target_modules):
            hint = (f" A single string is read as a regex over full module names (as in PEFT); "
                    f"to match every layer named {target_modules!r}, pass a list: "
                    f"[{target_modules!r}].")
        raise ValueError(f"{where}: target_modules {target_modules!r} match no linear layer of "
                         f"{type(model).__name__}.{hint} Its linear layers are: "
                         f"{sorted({n.split('.')[-1] for n in candidates})} (full names like "
                         f"{candidates[:3]})")
    return chosen


def inject_modules(model: nn.Module, module_names: list[str], r: int, lora_alpha: float, *,
                   lora_dropout: float = 0.0, adapter_name: str = "default",
                   use_rslora: bool = False, use_dora: bool = False,
                   checked: bool = False) -> nn.Module:
    """:func:`inject` for a caller that knows the exact layers: wrap the linear layers whose
    full names are ``module_names`` (``["model.layers.0.self_attn.q_proj", ...]``), no others.

    :func:`~loracore.adapters.load_adapter` uses it with the names an adapter file holds. The
    other arguments and the result are :func:`inject`'s. ``checked=True``: the caller has
    already checked every argument, ``module_names`` included (each a linear layer of
    ``model``), so nothing is checked again, here or layer by layer. All or nothing. Returns
    ``model``.
    """
    if not checked:
        if not isinstance(use_dora, bool):
            raise TypeError(f"inject_modules: use_dora must be True or False, got {use_dora!r}")
        check_adapter_args("inject_modules", adapter_name, r, lora_alpha, lora_dropout)
        if (isinstance(module_names, str) or not isinstance(module_names, (list, tuple))
                or not module_names or not all(isinstance(n, str) and n for n in module_names)):
            raise TypeError(f"inject_modules: module_names must be a non-empty list of full module "
                            f"names such as ['model.layers.0.self_attn.q_proj'], got {module_names!r}")
        linear = set(linear_layer_names(model))
        unknown = [n for n in module_names if n not in linear]
        if unknown:
            raise ValueError(f"inject_modules: {unknown} are not linear layers of "
                             f"{type(model).__name__} (full names like {sorted(linear)[:3]})")
    chosen = list(dict.fromkeys(module_names))  # each layer once, in the order given
    return _wrap(model, chosen, r, lora_alpha, lora_dropout, adapter_name, use_rslora, use_dora,
                 "inject_modules")


def changed_bases(model: nn.Module) -> dict[str, dict]:
    """Adapters of ``model`` whose initialisation changed their base weights (:func:`inject`
    with ``init_lora_weights="pissa"`` or ``"loftq"``): ``{adapter name: {"init": "pissa" |
    "loftq", "initial": {module name: (A0 (r, in), B0 (out, r))}, "fingerprint": the original
    base's fingerprint}}``; empty when there are none. The initial factors are what a PiSSA
    adapter subtracts to become a plain LoRA on the original base."""
    return dict(model.__dict__.get(_CHANGED, {}))


def _check_init_targets(model: nn.Module, chosen: list[str], r: int, init: str, where: str) -> None:
    """What PiSSA and LoftQ need of each target: a float ``nn.Linear`` with no LoRA yet (the base
    change would invalidate other adapters), a weight tied to nothing, and ``r <= min(out, in)``."""
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{where}: module {name!r} already has adapters {sorted(module.lora_A)}; "
                             f"init_lora_weights={init!r} changes the base weight they were trained "
                             f"on. Use it on a model without adapters (or remove_lora first)")
        if not is_float_linear(module):
            fix = ("LoftQ quantizes the float weights itself: inject with 'loftq' into the float "
                   "model, then quantize_model(model, double_quant=False)" if init == "loftq" else
                   "run PiSSA on the float model, then quantize the residual (quantize_model)")
            raise TypeError(f"{where}: module {name!r} is a {type(module).__name__}, not a float "
                            f"nn.Linear; init_lora_weights={init!r} needs the float weight. {fix}")
        tied = [n for n, p in model.named_parameters(remove_duplicate=False)
                if n != f"{name}.weight" and p.data_ptr() == module.weight.data_ptr()]
        if tied:
            raise ValueError(f"{where}: the weight of module {name!r} is tied to {tied}; "
                             f"init_lora_weights={init!r} would change those too. Leave it out of "
                             f"target_modules")
        if r > min(module.weight.shape):
            raise ValueError(f"{where}: r={r} is more than min(out, in) = {min(module.weight.shape)} "
                             f"of module {name!r}; init_lora_weights={init!r} needs r <= that")


@torch.no_grad()
def _init_from_base(layer: LoRALinear, adapter_name: str, init: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Set ``layer``'s adapter ``adapter_name`` to its PiSSA or LoftQ factors and put the changed
    base weight in a new ``Parameter`` (the old one is untouched, so a rollback puts it back).
    Returns the initial ``(A0, B0)``."""
    base = layer.base_layer
    weight, s = base.weight, layer.scaling[adapter_name]
    if init["init"] == "pissa":
        lora_A, lora_B, new = pissa_init(weight, layer.r[adapter_name], s, init.get("niter"))
    else:
        lora_A, lora_B, q = loftq_init(weight, layer.r[adapter_name], s, init["loftq_iter"])
        new = dequantize_nf4(q, torch.float32)
    layer.lora_A[adapter_name].weight.copy_(lora_A)
    layer.lora_B[adapter_name].weight.copy_(lora_B)
    base._parameters["weight"] = nn.Parameter(new.to(weight.dtype), requires_grad=False)
    return lora_A.clone(), lora_B.clone()


def _wrap(model: nn.Module, chosen: list[str], r: int, lora_alpha: float, lora_dropout: float,
          adapter_name: str, use_rslora: bool, use_dora: bool, where: str,
          init: dict | None = None) -> nn.Module:
    """Add the adapter to the linear layers ``chosen`` (full names; arguments already checked),
    refusing first what the model's state forbids: a name already taken, DoRA on a layer
    without a dense weight, a PiSSA/LoftQ target that is not a plain float layer."""
    taken = [n for n in chosen if isinstance(model.get_submodule(n), LoRALinear)
             and adapter_name in model.get_submodule(n).lora_A]
    if taken:
        raise ValueError(f"{where}: modules {taken} already have an adapter named {adapter_name!r}; "
                         f"pass another adapter_name, or delete_adapter(model, {adapter_name!r}) first")
    if use_dora:
        bases = {n: getattr(model.get_submodule(n), "base_layer", model.get_submodule(n)) for n in chosen}
        no_dense = [f"{n} ({type(b).__name__})" for n, b in bases.items()
                    if not is_float_linear(b) and not callable(getattr(b, "dequantize", None))]
        if no_dense:
            raise TypeError(f"{where}: DoRA needs each base weight as a float matrix (for its norm); "
                            f"modules {no_dense} have neither a float weight nor dequantize(). "
                            f"Leave them out of target_modules or use use_dora=False")
    if init is not None:
        _check_init_targets(model, chosen, r, init["init"], where)
        record = dict(init, initial={}, fingerprint=base_fingerprint(model, chosen))
    with all_or_nothing(model):
        if not hasattr(model, "_loracore_requires_grad"):  # so remove_lora can restore it
            model._loracore_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for name in chosen:
            module = model.get_submodule(name)
            if isinstance(module, LoRALinear):
                module.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                                   checked=True)
            else:
                layer = LoRALinear(module)
                layer.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                                  checked=True)
                if init is not None:
                    record["initial"][name] = _init_from_base(layer, adapter_name, init)
                _replace(model, name, layer)
        if init is not None:
            model.__dict__[_CHANGED] = {**changed_bases(model), adapter_name: record}
        set_adapter(model, adapter_name)
    return model


def replace_module(root: nn.Module, name: str, child: nn.Module) -> None:
    """Put ``child`` where ``root``'s submodule ``name`` is (a full dotted name such as
    ``"model.layers.0.mlp.up_proj"``, or a direct child's name). The one place loracore swaps
    a module: surgery here, quantization in :mod:`loracore.qlora`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, child)


# surgery's own swaps go through this module-level name, so that a test can make the n-th one
# fail and see the rollback.
_replace = replace_module


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model``, by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layers(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call inject() first")
    return layers


def _names(names: object, what: str) -> list[str]:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what}: adapter names must be a string or a list of strings, got {names!r}")
    return list(names)


def _check_known(layers: dict[str, LoRALinear], names: list[str], what: str) -> None:
    known = {n for layer in layers.values() for n in layer.lora_A}
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"{what}: no adapter named {missing} in the model (adapters: {sorted(known)})")


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """``(trainable, total, percent)`` parameter counts of ``model``.

    A quantized linear layer (e.g. ``Linear4bit``) keeps its weight in buffers of packed
    codes; it counts as its ``out_features * in_features`` logical weights, as PEFT counts it."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules()
                 if is_linear(m) and not is_float_linear(m)
                 and not isinstance(m._parameters.get("weight"), nn.Parameter))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, 100.0 * trainable / total if total else 0.0


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Activate adapter(s) ``names`` on every LoRA layer that has them (others: none active)."""
    names = _names(names, "set_adapter")
    layers = _layers(model, "set_adapter")
    _check_known(layers, names, "set_adapter")
    with all_or_nothing(model):
        for layer in layers.values():
            layer.set_adapter([n for n in names if n in layer.lora_A])


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block (see :meth:`LoRALinear.disable_adapters`):
    bit for bit, merged adapters included, and merged back exactly on exit."""
    with ExitStack() as stack:
        for layer in _layers(model, "disable_adapters").values():
            stack.enter_context(layer.disable_adapters())
        yield


def _params_by_address(model: nn.Module) -> dict[int, list[str]]:
    """Every non-empty parameter's names (a tied one under each of its names), by the address of
    its memory. Built once per call: walking ``named_parameters`` for each of hundreds of layers
    cost seconds on a 30-block model."""
    by_address: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            by_address.setdefault(p.data_ptr(), []).append(n)
    return by_address


def _tied_weights(by_address: dict[int, list[str]], layer_name: str, layer: LoRALinear) -> list[str]:
    """Names of the other parameters that hold the same memory as ``layer``'s base weight
    (``by_address``: :func:`_params_by_address` of the model)."""
    own = f"{layer_name}.base_layer.weight"
    return [n for n in by_address.get(layer.base_layer.weight.data_ptr(), []) if n != own]


def merge_adapters(model: nn.Module, names: list[str] | str | None = None) -> None:
    """Merge ``names`` (default: the active adapters) into every LoRA layer's base weight.

    Refused, before anything changes: an unknown name, a layer where one of them is already
    merged, a quantized base, and a base weight tied to another parameter (the output head of a
    tied-embedding model: merging would change the input embeddings too; keep that adapter
    unmerged or untie the weights first). All or nothing if a merge still fails (inf/NaN)."""
    layers = _layers(model, "merge_adapters")
    if names is not None:
        names = _names(names, "merge_adapters")
        _check_known(layers, names, "merge_adapters")
    plan = {n: [a for a in (layer.active_adapters if names is None else names) if a in layer.lora_A]
            for n, layer in layers.items()}
    plan = {n: wanted for n, wanted in plan.items() if wanted}
    by_address = _params_by_address(model)
    for name, wanted in plan.items():
        layer = layers[name]
        if not is_float_linear(layer.base_layer):
            raise TypeError(f"merge_adapters: module {name!r} has a {type(layer.base_layer).__name__} "
                            f"base, stored quantized, so ΔW cannot be added to it. Dequantize the "
                            f"base first, or keep the adapter unmerged")
        twice = [a for a in wanted if a in layer.merged_adapters]
        if twice:
            raise RuntimeError(f"merge_adapters: adapter(s) {twice} already merged into module "
                               f"{name!r}; call unmerge_adapters(model) first")
        tied = _tied_weights(by_address, name, layer)
        if tied:
            raise ValueError(f"merge_adapters: the weight of module {name!r} is tied to {tied} (tied "
                             f"embeddings): merging would change those too. Keep this adapter "
                             f"unmerged, or untie first: module.base_layer.weight = "
                             f"nn.Parameter(module.base_layer.weight.clone())")
    with all_or_nothing(model):
        for name, wanted in plan.items():
            try:
                layers[name].merge(wanted)
            except (ValueError, RuntimeError) as e:
                raise type(e)(f"merge_adapters: module {name!r}: {e}; nothing was merged") from e


def unmerge_adapters(model: nn.Module) -> None:
    """Undo every merge in ``model``: each base weight comes back bit for bit."""
    layers = _layers(model, "unmerge_adapters")
    with all_or_nothing(model):
        for layer in layers.values():
            layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every LoRA layer that has it (refused, before anything
    changes, if it is merged anywhere)."""
    if not isinstance(name, str):
        raise TypeError(f"delete_adapter: the adapter name must be a string, got {name!r}")
    layers = {n: layer for n, layer in _layers(model, "delete_adapter").items() if name in layer.lora_A}
    if not layers:
        _check_known(lora_layers(model), [name], "delete_adapter")
    merged = [n for n, layer in layers.items() if name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"delete_adapter: adapter {name!r} is merged into {merged}; call "
                           f"unmerge_adapters(model) first")
    with all_or_nothing(model):
        for layer in layers.values():
            layer.delete_adapter(name)
        changed = changed_bases(model)
        if changed.pop(name, None) is not None:  # its base stays changed; its record goes
            model.__dict__[_CHANGED] = changed
    forget_foreign(model, name)  # what load_adapter noted about this adapter's base


def remove_lora(model: nn.Module) -> nn.Module:
    """Unwrap every ``LoRALinear`` back to its base layer (unmerging first), in place.

    What is left is the original model: same modules, same names, base weights restored bit
    for bit (merged or not), and the ``requires_grad`` flags it had before :func:`inject`;
    except the base weights a PiSSA or LoftQ initialisation changed, which stay changed.
    Returns ``model``."""
    with all_or_nothing(model):
        for name, layer in lora_layers(model).items():
            layer.unmerge()
            _replace(model, name, layer.base_layer)
        forget_foreign(model)
        model.__dict__.pop(_CHANGED, None)
        flags = model.__dict__.pop("_loracore_requires_grad", None)
        if flags is not None:
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
    return model
