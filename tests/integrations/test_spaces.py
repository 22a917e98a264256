"""zerogpu.integrations.spaces, the `spaces` module apps written for Hugging Face's ZeroGPU import.

Off zerogpu it must do nothing (as the real package does off ZeroGPU); with
zerogpu enabled its GPU must be zerogpu's, in every form the real one takes.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
import warnings
from datetime import timedelta

import pytest
import torch

import zerogpu
from zerogpu import runtime
from zerogpu.integrations import spaces
from zerogpu.schedule.choice import scheduler

# The public names of the real package (spaces 0.51.3, spaces.__all__).
REAL_NAMES = [
    "GPU", "gradio_auto_wrap", "disable_gradio_auto_wrap", "enable_gradio_auto_wrap", "aoti_capture",
    "aoti_compile", "aoti_compile_and_save", "aoti_apply", "aoti_patch", "aoti_load", "aoti_load_call_source",
    "aoti_load_from_package_dir", "aoti_blocks_load",
]
AOTI = [name for name in REAL_NAMES if name.startswith("aoti_")]


@pytest.fixture
def auto_wrap_off():
    yield
    spaces.disable_gradio_auto_wrap()


@pytest.fixture
def installed(monkeypatch):
    """zerogpu.integrations.spaces installed as `spaces`, and sys.modules as it was afterwards."""
    for name in ("spaces", "spaces.config", "spaces.zero"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spaces.install()


def double(x):
    return 2 * x


# -- off zerogpu -----------------------------------------------------------------------------


@pytest.mark.parametrize("decorate", [
    lambda f: spaces.GPU(f),
    lambda f: spaces.GPU()(f),
    lambda f: spaces.GPU(duration=30)(f),
    lambda f: spaces.GPU(duration=timedelta(minutes=1), size="xlarge")(f),
    lambda f: spaces.GPU(duration=lambda x: 10)(f),
    lambda f: spaces.GPU(45)(f),
    lambda f: spaces.GPU("xlarge")(f),
])
def test_without_zerogpu_every_form_returns_the_function_itself(decorate):
    assert not runtime.is_enabled()
    assert decorate(double) is double
    assert spaces.config.Config.zero_gpu is False


def test_zero_startup_does_nothing_without_zerogpu():
    spaces.zero.startup()
    assert not runtime.is_enabled()
    assert runtime.models() == []


def test_enable_queue_is_ignored_with_the_real_warning():
    with pytest.warns(UserWarning, match="`enable_queue` parameter is now ignored"):
        decorated = spaces.GPU(enable_queue=True)(double)
    assert decorated is double


def test_unknown_keywords_are_refused_by_name():
    with pytest.raises(TypeError, match="'queue_size'.*duration= and size="):
        spaces.GPU(queue_size=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"duration": -1}, "positive number of seconds"),
    ({"duration": "long"}, "number of seconds or a datetime.timedelta"),
    ({"size": "medium"}, "'large' .* or 'xlarge'"),
])
def test_bad_values_are_refused_as_zerogpu_refuses_them(kwargs, message):
    with pytest.raises(zerogpu.InvalidArgument, match=message):
        spaces.GPU(**kwargs)


def test_every_public_name_of_the_real_package_exists():
    for name in REAL_NAMES:
        assert callable(getattr(spaces, name)), name
    assert sorted(spaces.__all__) == sorted([*REAL_NAMES, "config", "zero"])


@pytest.mark.parametrize("name", AOTI)
def test_ahead_of_time_compilation_is_refused_by_name(name):
    with pytest.raises(NotImplementedError, match=rf"spaces\.{name} .*torch\.compile"):
        getattr(spaces, name)(object())


def test_unknown_names_say_what_the_module_offers():
    with pytest.raises(AttributeError, match="'zero_gpu_v2'.*offers GPU"):
        spaces.zero_gpu_v2  # noqa: B018
    with pytest.raises(AttributeError, match="zero_device_api_url is a setting of Hugging Face"):
        spaces.config.Config.zero_device_api_url  # noqa: B018


def test_gradio_auto_wrap_is_off_by_default_and_passes_anything_through(auto_wrap_off):
    assert spaces.config.Config.gradio_auto_wrap is False
    assert spaces.gradio_auto_wrap(double) is double
    assert spaces.gradio_auto_wrap(None) is None


def test_install_makes_import_spaces_give_this_module(installed):
    import spaces as imported
    import spaces.config
    from spaces.zero import startup

    assert imported is spaces_module()
    assert spaces.config.Config is spaces_module().config.Config
    assert startup is spaces_module().zero.startup
    assert importlib.import_module("spaces.config").Config.zero_gpu is False


def spaces_module():
    return sys.modules["zerogpu.integrations.spaces"]


# -- with zerogpu ----------------------------------------------------------------------------


def test_gpu_function_runs_in_a_worker(gpu):
    @spaces.GPU(duration=20)
    def where(x):
        return os.getpid(), x + 1

    pid, value = where(41)
    assert pid != os.getpid()
    assert value == 42
    assert spaces.config.Config.zero_gpu is True


def test_forms_reach_zerogpu_with_their_duration_and_size(gpu):
    def f():
        return 1

    assert spaces.GPU(f).zerogpu.size == "large"
    assert spaces.GPU(45)(lambda: 1).zerogpu.duration == 45
    assert spaces.GPU("xlarge")(lambda: 1).zerogpu.size == "xlarge"
    hour = timedelta(hours=1)
    decorated = spaces.GPU(duration=hour, size="xlarge")(lambda: 1)
    assert (decorated.zerogpu.duration, decorated.zerogpu.size) == (hour, "xlarge")
    assert spaces.GPU(f) is spaces.GPU(f)  # decorating twice gives the same wrapper, as there


def test_duration_callable_gets_the_arguments_and_bounds_the_call(gpu):
    asked = []

    def budget(seconds, *, label):
        asked.append((seconds, label))
        return 0.2

    @spaces.GPU(duration=budget)
    def sleep(seconds, *, label):
        time.sleep(seconds)
        return label

    assert sleep(0, label="quick") == "quick"
    with pytest.raises(zerogpu.CallTimeout, match="ran past its duration of 0.2 s"):
        sleep(30, label="slow")
    assert asked == [(0, "quick"), (30, "slow")]


def test_generator_streams_its_values(gpu):
    @spaces.GPU(duration=lambda n: 5 + n)
    def count(n):
        for i in range(n):
            yield i, os.getpid()

    values = list(count(3))
    assert [i for i, _ in values] == [0, 1, 2]
    assert {pid for _, pid in values} != {os.getpid()}


def test_async_functions_work_unlike_in_the_real_package(gpu):
    @spaces.GPU
    async def triple(x):
        await asyncio.sleep(0)
        return 3 * x

    assert asyncio.run(triple(14)) == 42


def test_zero_startup_packs_what_was_moved_to_cuda(gpu):
    model = torch.nn.Linear(32, 32).to("cuda")
    spaces.zero.startup()
    (packed,) = runtime.models()
    assert packed.nbytes >= model.weight.numel() * 4


def test_gradio_auto_wrap_makes_gpu_functions_once_enabled(gpu, auto_wrap_off):
    spaces.enable_gradio_auto_wrap()
    assert spaces.config.Config.gradio_auto_wrap is True

    def event(x):
        return os.getpid(), x

    wrapped = spaces.gradio_auto_wrap(event)
    assert wrapped is not event
    pid, value = wrapped("hi")
    assert pid != os.getpid() and value == "hi"
    spaces.disable_gradio_auto_wrap()
    assert spaces.gradio_auto_wrap(event) is event


def test_enable_queue_still_decorates_with_zerogpu(gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decorated = spaces.GPU(enable_queue=True, duration=10)(double)
    assert decorated is not double
    assert decorated(21) == 42
