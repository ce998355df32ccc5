"""ModelRuntime.generate keeps its promise: the cache holds the prompt plus every token it
yielded, however the caller stops (found by the fuzz test: a one-token reply left its token
out), and the tokens are mlx-lm's greedy tokens from the full prompt."""

from __future__ import annotations

import contextlib

import pytest

from mlxkvd.runtime import ModelRuntime, Sampling


@pytest.fixture(scope="module")
def runtime(model_dir) -> ModelRuntime:
    return ModelRuntime(model_dir)


def _prompt(runtime) -> list[int]:
    return runtime.renderer.render([{"role": "user", "content": "Name three rivers."}]).ids


def _held(cache) -> int:
    return cache[0].offset


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_the_cache_holds_every_token_of_a_finished_reply(runtime, reference, max_tokens):
    prompt = _prompt(runtime)
    cache = runtime.make_cache()
    tokens = list(runtime.generate(prompt, cache, max_tokens=max_tokens, sampler=runtime.sampler(Sampling())))
    assert len(tokens) == max_tokens
    assert _held(cache) == len(prompt) + max_tokens
    assert tokens == reference.generate([{"role": "user", "content": "Name three rivers."}], max_tokens)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_the_cache_holds_every_token_yielded_when_the_caller_stops(runtime, stop_after):
    prompt = _prompt(runtime)
    cache = runtime.make_cache()
    seen = []
    with contextlib.closing(runtime.generate(prompt, cache, max_tokens=20, sampler=runtime.sampler(Sampling()))) as tokens:
        for token in tokens:
            seen.append(token)
            if len(seen) == stop_after:
                break
    assert _held(cache) == len(prompt) + stop_after
