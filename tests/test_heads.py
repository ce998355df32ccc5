"""The output head on one position (heads.py), on tiny random llamas: the shortcut where it is
exact, the model's own call where it is not."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlxkvd.heads import OnePosition


def _llama(tied: bool) -> llama.Model:
    mx.random.seed(7)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=500,
                           tie_word_embeddings=tied)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


class _SoftCapped(llama.Model):
    """A llama whose logits are soft-capped after the head (as Gemma 2's are)."""

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return 3.0 * mx.tanh(super().__call__(inputs, cache=cache) / 3.0)


def _inputs(n: int) -> mx.array:
    return mx.array([[(i * 31) % 450 + 20 for i in range(n)]], dtype=mx.uint32)


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_on_one_position_equals_the_models_own_logits(tied):
    model = _llama(tied)
    head = OnePosition(model, lambda: make_prompt_cache(model))
    assert head.shortcut
    history, new = _inputs(40), _inputs(25)

    def onto_history():
        cache = make_prompt_cache(model)
        model(history, cache=cache)
        return cache

    full = model(new, cache=onto_history())
    for position in (-1, 10):
        cache = onto_history()
        one = head.logits(new, cache, position)
        assert one.shape == (1, 500)
        assert mx.allclose(one, full[:, position, :], rtol=0, atol=1e-4).item()
        assert mx.argmax(one).item() == mx.argmax(full[:, position, :]).item()
        assert cache[0].offset == 65  # the pass wrote every position's keys and values


def test_a_model_that_changes_logits_after_its_head_is_called_as_it_is():
    mx.random.seed(7)
    model = _SoftCapped(_llama(tied=True).args)
    mx.eval(model.parameters())
    head = OnePosition(model, lambda: make_prompt_cache(model))
    assert not head.shortcut
    inputs = _inputs(12)
    assert mx.array_equal(head.logits(inputs, make_prompt_cache(model)),
                          model(inputs, cache=make_prompt_cache(model))[:, -1, :]).item()


def test_a_model_without_mlx_lms_layout_is_called_as_it_is():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Embedding(500, 500)

        def __call__(self, inputs, cache=None):
            return self.proj(inputs)

    model = Bare()
    head = OnePosition(model, lambda: [])
    assert not head.shortcut
    inputs = _inputs(5)
    assert mx.array_equal(head.logits(inputs, []), model(inputs)[:, -1, :]).item()


def test_without_the_shortcut_the_model_is_called_as_it_is():
    model = _llama(tied=True)
    probes = []
    head = OnePosition(model, lambda: probes.append(1) or make_prompt_cache(model), shortcut=False)
    assert not head.shortcut and not probes  # no start-up check
    inputs = _inputs(12)
    assert mx.array_equal(head.logits(inputs, make_prompt_cache(model)),
                          model(inputs, cache=make_prompt_cache(model))[:, -1, :]).item()
