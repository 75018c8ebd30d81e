"""loracore.serve.decoder: the serving forward pass agrees with the model's own, and a request's
logits are bit for bit the same whoever shares its batch. On the tiny random Qwen2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracore.models import build_tiny_qwen2
from loracore.serve.decoder import CHUNK, Decoder, KVCache


@pytest.fixture(scope="module")
def model():
    m, _ = build_tiny_qwen2(seed=3)
    return m.eval()


def test_kv_cache_grows_per_layer_and_returns_the_whole_layer():
    cache = KVCache()
    assert cache.length == 0
    k0, v0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    K, V = cache.append(0, k0, v0)
    assert K is k0 and V is v0 and cache.length == 3
    cache.append(1, k0 + 1, v0 + 1)
    k1, v1 = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    K, V = cache.append(0, k1, v1)
    assert K.shape == (2, 4, 4) and torch.equal(K, torch.cat([k0, k1], 1)) and torch.equal(V[:, 3:], v1)
    assert cache.length == 4 and cache.keys[1].shape == (2, 3, 4)  # layer 1 untouched


def test_prefill_and_decode_agree_with_the_models_own_forward(model):
    prompt = torch.tensor([5, 17, 3, 99, 42, 7])
    dec = Decoder(model)
    cache = KVCache()
    with torch.no_grad():
        logits = dec.prefill(prompt, cache, slot=-1)
        ref = model(prompt.unsqueeze(0)).logits[0, -1].float()
        assert logits.shape == (model.config.vocab_size,) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        assert cache.length == prompt.numel() and len(cache.keys) == model.config.num_hidden_layers
        nxt = torch.tensor([int(logits.argmax())])
        step = dec.decode(nxt, [cache], torch.tensor([-1]))
        ref = model(torch.cat([prompt, nxt]).unsqueeze(0)).logits[0, -1].float()
    assert step.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(step[0], ref, rtol=1e-4, atol=1e-4)
    assert cache.length == prompt.numel() + 1


def test_a_requests_logits_do_not_depend_on_its_batch_mates_bit_for_bit(model):
    dec = Decoder(model)
    g = torch.Generator().manual_seed(0)
    many = CHUNK + 3  # more rows than one chunk: a second, padded chunk
    prompts = [torch.randint(0, model.config.vocab_size, (1 + i % 9,), generator=g) for i in range(many)]
    ids = torch.randint(0, model.config.vocab_size, (many,), generator=g)
    with torch.no_grad():
        def prefilled(ps):
            cs = [KVCache() for _ in ps]
            for p, c in zip(ps, cs):
                dec.prefill(p, c, slot=-1)
            return cs

        alone = dec.decode(ids[:1], prefilled(prompts[:1]), torch.tensor([-1]))
        together = dec.decode(ids, prefilled(prompts), torch.full((many,), -1))
    assert together.shape == (many, model.config.vocab_size)
    assert torch.equal(alone[0], together[0])


class _NotALlama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Linear(2, 2)])


def test_other_architectures_and_sliding_windows_are_refused(model):
    with pytest.raises(TypeError, match="_NotALlama is not a Llama/Qwen2-style causal LM"):
        Decoder(_NotALlama())
    model.config.sliding_window, model.config.use_sliding_window = 8, True
    try:
        with pytest.raises(TypeError, match="sliding-window attention is not supported"):
            Decoder(model)
    finally:
        model.config.use_sliding_window = False
