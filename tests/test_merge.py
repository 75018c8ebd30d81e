"""Merging adapters: the pure functions equal PEFT's ``merge_utils`` bit for bit, and
``combine_adapters`` builds an exact, ordinary adapter (or refuses and changes nothing)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

pm = pytest.importorskip("peft.utils.merge_utils")
from peft import PeftModel  # noqa: E402

from loracore import merge as M  # noqa: E402
from loracore.adapters import save_adapter  # noqa: E402
from loracore.combine import combine_adapters, combined_delta, refactorize, refactorize_sum  # noqa: E402
from loracore.layer import LoRALinear  # noqa: E402
from loracore.surgery import inject, lora_layers, merge_adapters, set_adapter, unmerge_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning:UserWarning")
DENSITIES = [0.1, 0.3, 0.5, 0.9, 1.0]


def stack(n: int = 3, shape=(7, 11), seed: int = 0, ties_in_values: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g) for _ in range(n)]
    if ties_in_values:  # equal magnitudes and exact zeros: where top-k and sign ties hide
        ts = [torch.round(t * 2) / 2 for t in ts]
    return ts


def weights(n: int = 3) -> torch.Tensor:
    return torch.tensor([0.7, -0.4, 1.3, 0.5][:n])


# ---- the pure functions: exactly PEFT's ------------------------------------------------------
@pytest.mark.parametrize("ties_in_values", [False, True])
def test_building_blocks_equal_peft(ties_in_values):
    for t in stack(3, ties_in_values=ties_in_values):
        for d in DENSITIES[:-1]:
            assert torch.equal(M.prune(t, d, "magnitude"), pm.prune(t, d, "magnitude"))
            torch.manual_seed(5)
            want = pm.prune(t, d, "random", rescale=True)
            torch.manual_seed(5)
            assert torch.equal(M.prune(t, d, "random", rescale=True), want)
            torch.manual_seed(5)
            want = pm.prune(t, d, "random", rescale=False)
            torch.manual_seed(5)
            assert torch.equal(M.prune(t, d, "random", rescale=False), want)
    stacked = torch.stack(stack(4, ties_in_values=ties_in_values))
    for method in M.SIGN_METHODS:
        mask = M.calculate_majority_sign_mask(stacked, method)
        assert torch.equal(mask, pm.calculate_majority_sign_mask(stacked, method))
        assert torch.equal(M.disjoint_merge(stacked, mask), pm.disjoint_merge(stacked, mask))


@pytest.mark.parametrize("n,ties_in_values", [(2, False), (3, True), (4, False)])
def test_merges_equal_peft(n, ties_in_values):
    ts, w = stack(n, ties_in_values=ties_in_values, seed=n), weights(n)
    assert torch.equal(M.task_arithmetic(ts, w), pm.task_arithmetic(ts, w))
    for d in DENSITIES:
        assert torch.equal(M.magnitude_prune(ts, w, d), pm.magnitude_prune(ts, w, d))
        for sign in M.SIGN_METHODS:
            assert torch.equal(M.ties(ts, w, d, sign), pm.ties(ts, w, d, sign))
        for seed in (0, 1):
            torch.manual_seed(seed)
            want = pm.dare_linear(ts, w, d)
            torch.manual_seed(seed)
            assert torch.equal(M.dare_linear(ts, w, d), want)
            for sign in M.SIGN_METHODS:
                torch.manual_seed(seed)
                want = pm.dare_ties(ts, w, d, sign)
                torch.manual_seed(seed)
                assert torch.equal(M.dare_ties(ts, w, d, sign), want)


def test_magnitude_prune_by_threshold_keeps_topks_set(monkeypatch):
    """The CPU's selection shortcut (kthvalue) returns exactly what topk returns: on large
    tensors of every float dtype, with a tie at the threshold, with inf and NaN, and keeping
    nothing or everything; and it is really taken where it can be (topk is not called)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(96, 160, generator=g)
    cases = [big, big.to(torch.float64), big.to(torch.bfloat16), big.to(torch.float16),
             torch.round(big * 2) / 2,                                  # ties at the threshold
             torch.where(big > 2, torch.inf, big), torch.where(big > 2.5, torch.nan, big),
             torch.zeros(40, 50)]
    for t in cases:
        for d in (0.0001, 0.1, 0.3, 0.5, 0.9, 0.99999):
            ours, peft_s = M.prune(t, d, "magnitude"), pm.prune(t, d, "magnitude")
            assert torch.equal(ours.isnan(), peft_s.isnan()), (t.dtype, d)   # NaN != NaN in equal
            assert torch.equal(ours.nan_to_num(0.0), peft_s.nan_to_num(0.0)), (t.dtype, d)

    def no_topk(*args, **kwargs):
        raise AssertionError("topk called")
    monkeypatch.setattr(torch, "topk", no_topk)
    assert int((M.magnitude_prune_tensor(big, 0.3) != 0).sum()) == int(0.3 * big.numel())
    with pytest.raises(AssertionError, match="topk called"):  # a tie needs topk's own order
        M.magnitude_prune_tensor(torch.tensor([1.0, -1.0, 0.5]), 0.4)


def test_the_merges_are_not_all_the_same():
    """Guards the parity test: with distinct methods giving distinct results, equality with
    PEFT is a real check per method, not one function compared five times."""
    ts, w = stack(3), weights(3)
    torch.manual_seed(0)
    results = [M.task_arithmetic(ts, w), M.magnitude_prune(ts, w, 0.3), M.ties(ts, w, 0.3),
               M.ties(ts, w, 0.3, "frequency"), M.dare_linear(ts, w, 0.3), M.dare_ties(ts, w, 0.3)]
    for a, b in itertools.combinations(results, 2):
        assert not torch.equal(a, b)


def test_generator_makes_dare_reproducible_and_leaves_global_state_alone():
    ts, w = stack(2), weights(2)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a = M.dare_ties(ts, w, 0.4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), before)
    b = M.dare_ties(ts, w, 0.4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, M.dare_ties(ts, w, 0.4, generator=torch.Generator().manual_seed(10)))


def test_docstring_examples():
    t = torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 2.0], [-1.0, 2.0, 0.0]])
    mask = M.calculate_majority_sign_mask(t)
    assert mask.tolist() == [[True, False, False], [False, False, True], [False, True, False]]
    assert M.calculate_majority_sign_mask(t, "frequency")[:, 0].tolist() == [False, True, True]
    assert M.disjoint_merge(t, mask).tolist() == [3.0, 2.0, 2.0]
    assert M.magnitude_prune_tensor(torch.tensor([0.5, -2.0, 1.0, -0.1]), 0.5).tolist() == [0, -2, 1, 0]
    assert M.ties([torch.tensor([4.0, 1.0, -3.0]), torch.tensor([-2.0, 1.0, 0.5])],
                  [1.0, 1.0], 0.7).tolist() == [4.0, 1.0, -3.0]
    assert M.task_arithmetic([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])], [0.5, 0.5]).tolist() == [2, 0]
    g = torch.Generator().manual_seed(0)
    assert M.random_prune_tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, generator=g).tolist() == [2, 0, 6, 8]


def test_dare_keeps_the_expected_update():
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([M.random_prune_tensor(t, 0.2, generator=g) for _ in range(2000)]).mean(0)
    assert (mean - t).abs().max() < 0.35 and (mean - t).abs().mean() < 0.06


def test_pure_function_refusals():
    ts = stack(2)
    for bad in (0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="density"):
            M.ties(ts, [1, 1], bad)
    with pytest.raises(ValueError, match="one weight per task tensor"):
        M.task_arithmetic(ts, [1.0])
    with pytest.raises(ValueError, match="share one shape"):
        M.task_arithmetic([torch.zeros(2, 3), torch.zeros(3, 2)], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        M.task_arithmetic([], [])
    with pytest.raises(ValueError, match="'total', 'frequency'"):
        M.calculate_majority_sign_mask(torch.stack(ts), "mass")
    with pytest.raises(ValueError, match="magnitude' or 'random"):
        M.prune(ts[0], 0.5, "largest")


# ---- re-factorisation ------------------------------------------------------------------------
def test_refactorize_sum_is_the_truncated_svd_without_dense_svd():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(4, 40, generator=g, dtype=torch.float64), torch.randn(6, 40, generator=g, dtype=torch.float64)]
    Bs = [torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 6, generator=g, dtype=torch.float64)]
    full = Bs[0] @ As[0] + Bs[1] @ As[1]
    A, B = refactorize_sum(As, Bs, 10)
    assert A.shape == (10, 40) and B.shape == (30, 10)
    torch.testing.assert_close(B @ A, full, atol=1e-10, rtol=0)
    for k in (3, 7):  # truncated: the same as the dense SVD's best rank-k
        A, B = refactorize_sum(As, Bs, k)
        A2, B2 = refactorize(full, k)
        torch.testing.assert_close(B @ A, B2 @ A2, atol=1e-9, rtol=0)


# ---- combine_adapters on a model ---------------------------------------------------------------
TARGETS = ["q_proj", "v_proj", "up_proj"]


def two_adapters(model: nn.Module, r1: int = 4, r2: int = 6, seed: int = 1) -> nn.Module:
    """Adapters "a" (r1, alpha 8) and "b" (r2, alpha 12, rsLoRA) with non-zero A and B."""
    inject(model, TARGETS, r=r1, lora_alpha=8, adapter_name="a")
    inject(model, TARGETS, r=r2, lora_alpha=12, adapter_name="b", use_rslora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for d in (layer.lora_A, layer.lora_B):
                for lin in d.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
    set_adapter(model, "a")
    return model


def test_linear_is_exact_with_different_ranks_and_scalings(tiny, tmp_path):
    model = two_adapters(tiny[0])
    combine_adapters(model, ["a", "b"], [0.7, 0.3], "ab", combination_type="linear")
    for name, layer in lora_layers(model).items():
        want = 0.7 * layer.get_delta_weight("a") + 0.3 * layer.get_delta_weight("b")
        assert layer.r["ab"] == min(10, layer.in_features, layer.out_features)
        assert layer.scaling["ab"] == 1.0
        torch.testing.assert_close(layer.get_delta_weight("ab"), want, atol=1e-5, rtol=0)
        assert layer.active_adapters == ["a"]  # combining activates nothing
        assert not any(p.requires_grad for p in layer.lora_A["ab"].parameters())

    # an ordinary adapter: its logits are base + 0.7 ΔW_a + 0.3 ΔW_b, in loracore and in PEFT
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        set_adapter(model, "ab")
        ours = model(input_ids=ids).logits
        merge_adapters(model, "ab")
        merged = model(input_ids=ids).logits
        unmerge_adapters(model)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():  # the same combination, as two live adapters
            layer.lora_B["a"].weight.mul_(0.7)
            layer.lora_B["b"].weight.mul_(0.3)
    set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = model(input_ids=ids).logits
    torch.testing.assert_close(ours, both, atol=1e-5, rtol=0)
    assert (ours - tiny_logits(ids)).abs().max() > 1e-3  # the adapter really changes the model

    save_adapter(model, tmp_path / "ab", "ab")
    from loracore.models import load_base_model
    theirs = PeftModel.from_pretrained(load_base_model("tiny-qwen2", verbose=False)[0], tmp_path / "ab").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


def tiny_logits(ids: torch.Tensor) -> torch.Tensor:
    from loracore.models import load_base_model
    with torch.no_grad():
        return load_base_model("tiny-qwen2", verbose=False)[0](input_ids=ids).logits


@pytest.mark.parametrize("method,density,sign", [
    ("linear", None, "total"), ("task_arithmetic", None, "total"), ("magnitude_prune", 0.3, "total"),
    ("ties", 0.3, "total"), ("ties", 0.5, "frequency"), ("dare_linear", 0.4, "total"),
    ("dare_ties", 0.4, "frequency")])
def test_full_rank_reproduces_the_pure_function(tiny, method, density, sign):
    model = two_adapters(tiny[0])
    torch.manual_seed(11)  # DARE draws from the global generator, layer by layer in model order
    combine_adapters(model, ["a", "b"], [0.6, 0.5], "m", combination_type=method, density=density,
                     majority_sign_method=sign, svd_rank=10_000)
    torch.manual_seed(11)
    pure = {"linear": M.task_arithmetic, "task_arithmetic": M.task_arithmetic}.get(method)
    for name, layer in lora_layers(model).items():
        deltas = [layer.get_delta_weight("a"), layer.get_delta_weight("b")]
        w = torch.tensor([0.6, 0.5])
        if method in ("linear", "task_arithmetic"):
            want = pure(deltas, w)
        elif method == "magnitude_prune":
            want = pm.magnitude_prune(deltas, w, density)
        elif method == "ties":
            want = pm.ties(deltas, w, density, sign)
        elif method == "dare_linear":
            want = pm.dare_linear(deltas, w, density)
        else:
            want = pm.dare_ties(deltas, w, density, sign)
        full = min(layer.in_features, layer.out_features)
        assert layer.r["m"] == (min(10, full) if pure else full)  # linear: exact at r_a + r_b
        torch.testing.assert_close(layer.get_delta_weight("m"), want, atol=2e-5, rtol=0)


def test_generator_and_combined_delta(tiny):
    model = two_adapters(tiny[0])
    combine_adapters(model, ["a", "b"], [1, 1], "x", combination_type="dare_ties", density=0.5,
                     svd_rank=10_000, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    for layer in lora_layers(model).values():
        want = combined_delta(layer, ["a", "b"], [1, 1], "dare_ties", 0.5, generator=g)
        torch.testing.assert_close(layer.get_delta_weight("x"), want, atol=2e-5, rtol=0)


def test_truncation_error_falls_with_rank_eckart_young(tiny):
    model = two_adapters(tiny[0], r1=8, r2=8)
    errors = []
    for k in (1, 2, 4, 8, 16):
        combine_adapters(model, ["a", "b"], [1, 1], f"t{k}", combination_type="ties", density=0.3,
                         svd_rank=k)
        err = 0.0
        for layer in lora_layers(model).values():
            want = combined_delta(layer, ["a", "b"], [1, 1], "ties", 0.3)
            got = layer.get_delta_weight(f"t{k}")
            err += (got - want).norm().item() ** 2
            S = torch.linalg.svdvals(want)  # Eckart-Young: the error is the dropped singular values
            assert abs((got - want).norm().item() - S[k:].norm().item()) < 1e-4
        errors.append(err ** 0.5)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def snapshot(model: nn.Module) -> dict:
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "lora": {n: (list(m.active_adapters), dict(m.r), dict(m.scaling), list(m.merged_adapters))
                     for n, m in lora_layers(model).items()}}


def same(a: dict, b: dict) -> bool:
    return (a["modules"] == b["modules"] and a["grad"] == b["grad"] and a["lora"] == b["lora"]
            and a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


@pytest.mark.parametrize("fail_at", [1, 3])
def test_failure_half_way_leaves_the_model_as_it_was(tiny, monkeypatch, fail_at):
    model = two_adapters(tiny[0])
    before = snapshot(model)
    calls = {"n": 0}
    real = LoRALinear.add_adapter

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        combine_adapters(model, ["a", "b"], [1, 1], "c", combination_type="ties")
    assert calls["n"] == fail_at and fail_at < len(lora_layers(model))
    assert same(before, snapshot(model))
    monkeypatch.setattr(LoRALinear, "add_adapter", real)
    combine_adapters(model, ["a", "b"], [1, 1], "c", combination_type="ties")  # and then it works
    assert not same(before, snapshot(model))


def test_non_finite_result_is_refused_and_nothing_changes(tiny):
    model = two_adapters(tiny[0])
    last = list(lora_layers(model).values())[-1]
    with torch.no_grad():
        last.lora_B["b"].weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="not finite.*" + list(lora_layers(model))[-1].replace(".", r"\.")):
        combine_adapters(model, ["a", "b"], [1, 1], "c", combination_type="linear")
    assert same(before, snapshot(model))


def test_refusals_name_the_problem(tiny):
    model = two_adapters(tiny[0])
    inject(model, ["k_proj"], r=2, lora_alpha=2, adapter_name="k_only")
    before = snapshot(model)
    cases = [
        (dict(adapters=["a", "zz"]), KeyError, "no adapter named \\['zz'\\]"),
        (dict(weights=[1.0]), ValueError, "one weight per adapter"),
        (dict(weights=[1.0, float("nan")]), ValueError, "finite"),
        (dict(density=0.0), ValueError, "density"),
        (dict(density=1.2), ValueError, "density"),
        (dict(combination_type="svd"), ValueError, "known: \\['linear', 'task_arithmetic'"),
        (dict(majority_sign_method="mass"), ValueError, "'total', 'frequency'"),
        (dict(adapter_name="b"), ValueError, "already has an adapter named 'b'"),
        (dict(adapter_name="a.b"), ValueError, "without dots"),
        (dict(svd_rank=0), ValueError, "svd_rank"),
        (dict(combination_type="linear", density=0.5), ValueError, "no effect"),
        (dict(combination_type="dare_linear"), ValueError, "needs a density"),
        (dict(adapters=["a", "k_only"]), ValueError, "different layers.*k_proj"),
        (dict(adapters=[]), ValueError, "non-empty list"),
    ]
    for override, exc, match in cases:
        kwargs = dict(adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="new")
        kwargs.update(override)
        if "adapters" in override and "weights" not in override:
            kwargs["weights"] = [1.0] * len(kwargs["adapters"])
        with pytest.raises(exc, match=match):
            combine_adapters(model, **kwargs)
        assert same(before, snapshot(model)), override
    with pytest.raises(ValueError, match="no LoRA layers"):
        from loracore.models import load_base_model
        combine_adapters(load_base_model("tiny-qwen2", verbose=False)[0], ["a"], [1], "x")


# ---- lab 04's self-checks (loracore/checks/lab04.py) --------------------------------------------
def test_lab04_checks_pass_right_answers_and_explain_wrong_ones(capsys):
    from loracore.checks import lab04
    from loracore.selfcheck import ExerciseFailed

    def trim(t, density):
        return M.prune(t, density, "magnitude")

    def elect(s):
        return M.calculate_majority_sign_mask(s)

    def my_ties(ts, w, d):
        return M.ties(ts, w, d)

    lab04.check_trim(trim)
    lab04.check_elect(elect)
    lab04.check_disjoint_mean(M.disjoint_merge)
    lab04.check_drop_and_rescale(lambda t, d, g=None: M.prune(t, d, "random", rescale=True, generator=g))
    lab04.check_ties(my_ties)
    assert "all 3 checks passed" in capsys.readouterr().out

    wrong = [  # the usual mistakes, each caught with its hint
        (lab04.check_trim, lambda t, d: torch.where(t.abs() >= t.abs().quantile(1 - d), t, 0), "topk"),
        (lab04.check_elect, lambda s: s.sign() == torch.where(s.sign().sum(0) > 0, 1.0, -1.0), "SUM over tasks"),
        (lab04.check_disjoint_mean, lambda s, m: (s * m).sum(0) / m.sum(0), "clamped to at least 1"),
        (lab04.check_drop_and_rescale, lambda t, d, g=None: t * (torch.rand(t.shape, generator=g) < d),
         "divide by density"),
        (lab04.check_ties, lambda ts, w, d: M.disjoint_merge(
            torch.stack(ts) * w[:, None, None], M.calculate_majority_sign_mask(torch.stack(ts) * w[:, None, None])),
         "UNWEIGHTED"),
    ]
    for check, fn, hint in wrong:
        with pytest.raises(ExerciseFailed):
            check(fn)
        assert hint in capsys.readouterr().out

    def stub(*args):
        raise NotImplementedError("Exercise")
    with pytest.raises(ExerciseFailed, match="not written yet"):
        lab04.check_trim(stub)


def test_adapters_from_another_base_are_refused(tiny, tmp_path):
    """An adapter loaded with strict=False onto a base it was not trained on is recorded, and
    combining it is refused with the fingerprint's reason; deleting it clears the record."""
    import warnings

    from loracore.adapters import foreign_adapters, load_adapter
    from loracore.models import load_base_model
    from loracore.surgery import delete_adapter

    other = load_base_model("tiny-qwen2", verbose=False)[0]
    with torch.no_grad():  # a "fine-tuned variant": same shapes, different weights
        other.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    two_adapters(other)
    save_adapter(other, tmp_path / "elsewhere", adapter_name="a")
    save_adapter(other, tmp_path / "also_elsewhere", adapter_name="b")

    model = two_adapters(tiny[0])
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(model, tmp_path / "elsewhere", adapter_name="x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(model, tmp_path / "elsewhere", adapter_name="x", strict=False)
    assert list(foreign_adapters(model)) == ["x"] and "hash differently" in foreign_adapters(model)["x"][0]
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter 'x' was loaded \\(strict=False\\) onto a base model it "
                                         "was not trained on: base weights: the targeted weights hash"):
        combine_adapters(model, ["a", "x"], [0.5, 0.5], "ax", combination_type="linear")
    assert same(before, snapshot(model))
    combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", combination_type="linear")  # own-base ones still work

    delete_adapter(model, "x")
    assert foreign_adapters(model) == {}
    # reloading the same name from a file saved on THIS base leaves no record
    save_adapter(model, tmp_path / "here", adapter_name="b")
    load_adapter(model, tmp_path / "here", adapter_name="x")
    assert foreign_adapters(model) == {}
    combine_adapters(model, ["a", "x"], [0.5, 0.5], "ax", combination_type="linear")
