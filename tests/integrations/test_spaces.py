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


def test_unknown_keywords_are_ignored_with_one_warning(monkeypatch):
    monkeypatch.setattr(spaces, "_warned", set())
    with pytest.warns(UserWarning, match="ignores 'queue'.*duration= and size="):
        decorated = spaces.GPU(duration=60, queue=False)(double)
    assert decorated is double
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spaces.GPU(queue=True)(double) is double  # warned once already


def test_unknown_keywords_decorate_with_zerogpu(gpu, monkeypatch):
    monkeypatch.setattr(spaces, "_warned", set())
    with pytest.warns(UserWarning, match="ignores 'queue'"):
        decorated = spaces.GPU(duration=30, queue=False)(double)
    assert decorated is not double and decorated(21) == 42


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


def test_ahead_of_time_helpers_refuse_bad_input_saying_what_to_do(tmp_path):
    with pytest.raises(zerogpu.InvalidArgument, match="torch.export.ExportedProgram.*export the module first"):
        spaces.aoti_compile(object())
    with pytest.raises(zerogpu.InvalidArgument, match="what zerogpu.aot.compile returned"):
        spaces.aoti_apply(object(), torch.nn.Linear(2, 2))
    with pytest.raises(zerogpu.InvalidArgument, match="neither root/ nor submodules/"):
        spaces.aoti_load_from_package_dir(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(zerogpu.InvalidArgument, match="no _repeated_blocks"):
        spaces.aoti_blocks_load(torch.nn.Linear(2, 2), str(tmp_path))
    with pytest.raises(zerogpu.InvalidArgument, match="no compiled package at .*Block.*compile it and save it"):
        spaces.aoti_blocks_load(type("M", (torch.nn.Module,), {"_repeated_blocks": ["Block"]})(), str(tmp_path))
    with pytest.raises(zerogpu.InvalidArgument, match="no method 'call'"):
        with spaces.aoti_capture(torch.nn.Linear(2, 2), "call"):
            pass


def test_capture_catches_the_first_call_and_ends_the_block_there():
    module = torch.nn.Linear(2, 2)
    reached = []
    with spaces.aoti_capture(module) as call:
        module.forward(torch.ones(1, 2), scale=3)
        reached.append(True)
    assert not reached and call.kwargs == {"scale": 3} and torch.equal(call.args[0], torch.ones(1, 2))
    assert "forward" not in vars(module) and module(torch.ones(1, 2)).shape == (1, 2)


def test_load_call_source_names_the_call_and_the_loader():
    def loader(module, folder):
        return None

    source = spaces.aoti_load_call_source("pipe.transformer", "me/compiled", aoti_loader=loader)
    assert source.startswith("def loader(module, folder):")
    assert "spaces.aoti_load(\n    module=pipe.transformer,\n    repo_id='me/compiled',\n    aoti_loader=loader,\n)" in source


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
