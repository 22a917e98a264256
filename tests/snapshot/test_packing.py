"""The runtime's packing: recorded tensors become views of one snapshot, then of each restored copy.

A restore rebinds every tensor in one pass (PackedModel.rebind): in place with
`set_` where the device does not change, through a view where `set_` is
refused. Either way each tensor keeps its identity, its layout and what it
shares, and the emulated devices count its memory where it now lives.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref

import pytest
import torch

from zerogpu.cuda import registry
from zerogpu.errors import InvalidArgument
from zerogpu.snapshot import packing


def inside(tensor: torch.Tensor, region: torch.Tensor) -> bool:
    start = region.data_ptr()
    return start <= tensor.data_ptr() < start + region.numel()


def recorded_tensors() -> dict[str, torch.Tensor]:
    weight = torch.nn.Parameter(torch.randn(6, 4))
    with torch.inference_mode():
        frozen = torch.randn(5)  # refuses set_ outside inference mode: rebound through a view
    tensors = {
        "weight": weight,
        "tied": weight.data[2:],  # another tensor over the weight's storage, 8 elements in
        "transposed": torch.randn(3, 7).t(),
        "frozen": frozen,
        "detached": torch.randn(4).detach(),
        "empty": torch.empty(0, 3),
    }
    for tensor in tensors.values():
        registry.mark(tensor)
    return tensors


def marked_parameters(step: int) -> list[torch.nn.Parameter]:
    """Four recorded parameters of step, 2 * step, 3 * step and 4 * step elements."""
    tensors = [torch.nn.Parameter(torch.randn(step * (i + 1))) for i in range(4)]
    for tensor in tensors:
        registry.mark(tensor)
    return tensors


def test_a_packed_model_rebinds_onto_a_restored_copy_keeping_identity_layout_and_sharing(gpu):
    tensors = recorded_tensors()
    layouts = {name: (t.dtype, t.shape, t.stride(), t.storage_offset()) for name, t in tensors.items()}
    values = {name: t.clone() for name, t in tensors.items()}
    model = packing.pack(list(tensors.values()))
    region = model.snapshot.region()
    held = torch.cuda.memory_allocated()
    assert held > 0
    try:
        for name, tensor in tensors.items():
            assert tensor.numel() == 0 or inside(tensor, region), name

        restored = region.clone()  # what a worker's restore leaves on its device
        model.rebind(restored, keep_mark=True)

        for name, tensor in tensors.items():
            assert (tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset()) == layouts[name], name
            assert torch.equal(tensor, values[name]), name
            assert tensor.numel() == 0 or inside(tensor, restored), name
            assert registry.is_cuda(tensor) and tensor.device == torch.device("cuda", 0), name
        weight, tied = tensors["weight"], tensors["tied"]
        assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad
        assert tied.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        with torch.no_grad():
            weight[2, 0] = 42.0
        assert tied[0, 0] == 42.0  # still one storage, as before packing
        # The same storages, counted once each, now in the restored copy.
        assert torch.cuda.memory_allocated() == held
    finally:
        model.close()


def test_rebinding_without_the_mark_leaves_plain_tensors(gpu):
    tensors = recorded_tensors()
    model = packing.pack(list(tensors.values()))
    try:
        model.rebind(model.snapshot.region().clone(), keep_mark=False)
        assert not any(registry.is_cuda(tensor) for tensor in tensors.values())
        assert torch.cuda.memory_allocated() == 0
    finally:
        model.close()


def test_a_rebind_is_no_write_to_autograd(gpu):
    """`.data =` never counted as an in-place write; the in-place rebind must not either."""
    weight = torch.nn.Parameter(torch.randn(4, 3))
    registry.mark(weight)
    with torch.no_grad():
        half = weight[:2]  # a view made under no_grad: any later write to its base forbids its use
    loss = (weight * weight).sum()  # a graph that saved the weight before the pack
    version = weight._version
    model = packing.pack([weight])
    try:
        model.rebind(model.snapshot.region().clone(), keep_mark=True)
        assert weight._version == version
        loss.backward()
        assert torch.equal(weight.grad, 2 * weight.detach())
        assert (half * 2).sum().requires_grad
    finally:
        model.close()


def test_an_empty_tensor_placed_where_a_weight_starts_does_not_hide_the_weights_memory(gpu):
    tensors = [torch.empty(0), torch.randn(1000), torch.empty(0, 4), torch.randn(10)]
    for tensor in tensors:
        registry.mark(tensor)
    model = packing.pack(tensors)
    try:
        assert torch.cuda.memory_allocated() == 1000 * 4 + 10 * 4
        model.rebind(model.snapshot.region().clone(), keep_mark=True)
        assert torch.cuda.memory_allocated() == 1000 * 4 + 10 * 4
    finally:
        model.close()


def test_the_memory_count_follows_restores_and_tensors_that_die(gpu):
    kept, dropped = torch.randn(1000), torch.randn(500)
    registry.mark(kept)
    registry.mark(dropped)
    model = packing.pack([kept, dropped])
    try:
        assert torch.cuda.memory_allocated() == 1500 * 4
        del dropped  # its binding dies before the restore: nothing of it is rebound
        assert torch.cuda.memory_allocated() == 1000 * 4
        first = model.snapshot.region().clone()
        model.rebind(first, keep_mark=True)
        assert torch.cuda.memory_allocated() == 1000 * 4
        second = model.snapshot.region().clone()
        model.rebind(second, keep_mark=True)  # a second restore moves the count again, not adds to it
        assert torch.cuda.memory_allocated() == 1000 * 4
        assert inside(kept, second) and not inside(kept, first)
        del kept
        assert torch.cuda.memory_allocated() == 0
    finally:
        model.close()


def test_a_rebind_marks_a_bound_tensor_that_was_not_marked(gpu):
    tensor = torch.randn(64)
    registry.mark(tensor)
    model = packing.pack([tensor])
    try:
        registry.unmark(tensor)
        assert torch.cuda.memory_allocated() == 0
        model.rebind(model.snapshot.region().clone(), keep_mark=True)
        assert registry.is_cuda(tensor) and torch.cuda.memory_allocated() == 64 * 4
    finally:
        model.close()


def test_a_buffer_of_the_wrong_size_is_refused_before_any_tensor_moves(gpu):
    tensors = recorded_tensors()
    model = packing.pack(list(tensors.values()))
    try:
        region = model.snapshot.region()
        pointers = {name: t.data_ptr() for name, t in tensors.items()}
        with pytest.raises(InvalidArgument, match=f"1-D torch.uint8 tensor of {model.nbytes} bytes"):
            model.rebind(torch.zeros(model.nbytes - 1, dtype=torch.uint8), keep_mark=True)
        assert {name: t.data_ptr() for name, t in tensors.items()} == pointers
        assert all(t.numel() == 0 or inside(t, region) for t in tensors.values())
    finally:
        model.close()


def test_a_rebind_stopped_half_way_counts_each_tensor_where_it_is(gpu, monkeypatch):
    tensors = marked_parameters(100)
    model = packing.pack(tensors)
    try:
        held = torch.cuda.memory_allocated()
        calls = []
        set_ = torch.Tensor.set_

        def stop_at_the_third(self, *args):
            calls.append(self)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return set_(self, *args)

        monkeypatch.setattr(torch.Tensor, "set_", stop_at_the_third)
        restored = model.snapshot.region().clone()
        with pytest.raises(KeyboardInterrupt):
            model.rebind(restored, keep_mark=True)
        monkeypatch.undo()
        assert [inside(t, restored) for t in tensors] == [True, True, False, False]
        assert all(t._version == 0 for t in tensors)  # the two moved had their versions put back
        assert torch.cuda.memory_allocated() == held
        # Each tensor is counted under the storage it now has, moved or not, so that its count
        # goes when that storage does.
        holders = registry.marked.memory._holders
        assert [holders[id(t)][0] for t in tensors] == [t.untyped_storage().data_ptr() for t in tensors]
    finally:
        model.close()


def test_packing_gives_each_tensor_a_new_impl_and_keeps_everything_a_user_sees(gpu):
    """The pack replaces each plain tensor's TensorImpl with one made beside the others (so a
    worker's rebind writes to few pages); the Python object, and all it carries, stays."""
    module = torch.nn.Linear(4, 3)
    frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)
    buffer = torch.randn(6)
    with torch.no_grad():
        module.weight.add_(1)  # a version other than 0, which must survive the swap
    module.weight.note = "kept"
    tensors = [module.weight, module.bias, frozen, buffer]
    for tensor in tensors:
        registry.mark(tensor)
    refs = [weakref.ref(t) for t in tensors]
    impls = [t._cdata for t in tensors]
    versions = [t._version for t in tensors]
    values = [t.detach().clone() for t in tensors]
    model = packing.pack(tensors)
    try:
        region = model.snapshot.region()
        assert [ref() for ref in refs] == tensors
        assert all(t._cdata != impl for t, impl in zip(tensors, impls))
        assert [t._version for t in tensors] == versions
        assert [type(t) for t in tensors] == [torch.nn.Parameter] * 3 + [torch.Tensor]
        assert [t.requires_grad for t in tensors] == [True, True, False, False]
        assert module.weight.note == "kept" and module.weight is tensors[0]
        for tensor, value in zip(tensors, values):
            assert inside(tensor, region) and torch.equal(tensor, value)
            assert registry.is_cuda(tensor)
        module(torch.randn(2, 4, device="cuda")).sum().backward()
        assert module.weight.grad.shape == (3, 4) and module.bias.grad.shape == (3,)
    finally:
        model.close()


def test_a_tensor_whose_impl_something_else_holds_keeps_it_and_still_moves(gpu):
    """A view of it, a grad, a hook, a graph: each lives on the impl, so the tensor keeps its
    impl and is rebound in place, with all of them."""
    viewed = torch.randn(8, device="cuda")
    view = viewed[2:]
    graded = torch.nn.Parameter(torch.randn(3, device="cuda"))
    graded.grad = torch.ones(3, device="cuda")
    hooked = torch.nn.Parameter(torch.randn(3, device="cuda"))
    fired = []
    hooked.register_hook(lambda grad: fired.append("hook"))
    accumulated = torch.nn.Parameter(torch.randn(3, device="cuda"))
    accumulated.register_post_accumulate_grad_hook(lambda tensor: fired.append("accumulated"))
    saved = torch.nn.Parameter(torch.randn(3, device="cuda"))
    loss = (saved * saved).sum()
    tensors = [viewed, graded, hooked, accumulated, saved]
    impls = [t._cdata for t in tensors]
    model = packing.pack(tensors)
    try:
        region = model.snapshot.region()
        assert [t._cdata for t in tensors] == impls
        assert all(inside(t, region) for t in tensors)
        assert view._base is viewed
        assert torch.equal(graded.grad, torch.ones(3, device="cuda"))
        ((hooked * 2).sum() + (accumulated * 2).sum()).backward()
        assert sorted(fired) == ["accumulated", "hook"]
        loss.backward()
        assert torch.equal(saved.grad, 2 * saved.detach())
    finally:
        model.close()


def test_a_pack_that_fails_while_swapping_impls_counts_each_tensor_where_it_is(gpu, monkeypatch):
    tensors = marked_parameters(10)
    values = [t.detach().clone() for t in tensors]
    held = torch.cuda.memory_allocated()
    swaps = []
    swap = packing.swap_impl

    class Stop(Exception):
        pass

    def fail_at_the_third(tensor, fresh):
        swaps.append(tensor)
        if len(swaps) == 3:
            raise Stop("the swap failed")
        swap(tensor, fresh)

    monkeypatch.setattr(packing, "swap_impl", fail_at_the_third)
    with pytest.raises(Stop, match="the swap failed"):
        packing.pack(tensors)
    assert [t._version for t in tensors] == [0] * 4
    assert all(torch.equal(t, value) for t, value in zip(tensors, values))
    holders = registry.marked.memory._holders
    assert [holders[id(t)][0] for t in tensors] == [t.untyped_storage().data_ptr() for t in tensors]
    assert torch.cuda.memory_allocated() == held


def test_a_job_run_on_a_new_thread_gives_its_error_and_is_waited_for_when_interrupted():
    with pytest.raises(ValueError, match="from the job"):
        packing.run_on_new_thread(lambda: (_ for _ in ()).throw(ValueError("from the job")))

    main = threading.main_thread().ident
    finished = threading.Event()

    def waited_for() -> bool:
        frame = sys._current_frames()[main]
        if frame.f_code.co_name != "wait":
            return False
        while frame.f_code.co_name == "wait":  # Condition.wait, in Event.wait
            frame = frame.f_back
        return frame.f_code.co_name == "run_on_new_thread"  # not Thread.start's wait

    def job():
        # Interrupt the caller once it waits for this job, then go on working.
        while not waited_for():
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        finished.set()

    with pytest.raises(KeyboardInterrupt):
        packing.run_on_new_thread(job)
    assert finished.is_set()

    finished.clear()

    def job_interrupted_twice():
        for _ in range(2):
            while not waited_for():
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the caller takes the interrupt and waits again
        time.sleep(0.1)
        finished.set()

    with pytest.raises(KeyboardInterrupt):
        packing.run_on_new_thread(job_interrupted_twice)
    assert finished.is_set()


def test_a_tensor_packed_unmarked_is_marked_on_the_callers_device():
    """The pack's rebind runs on a thread of its own; the device it marks on is still the caller's."""
    from zerogpu.cuda import emulation

    emulation.patch(emulation.DeviceInfo(name="Test GPU", total_memory=2**30, major=8, minor=6,
                                         multi_processor_count=10, count=2))
    try:
        tensor = torch.randn(16)
        torch.cuda.set_device(1)
        model = packing.pack([tensor])
        try:
            assert registry.is_cuda(tensor) and tensor.device == torch.device("cuda", 1)
        finally:
            model.close()
    finally:
        torch.cuda.set_device(0)
        emulation.unpatch()
        registry.unmark(tensor)


def test_a_parameter_and_the_tensor_it_wraps_still_share_their_version_after_packing(gpu):
    """They share a version counter: a write through the tensor must still make a graph that
    saved the parameter refuse to run backward, rather than give a wrong gradient."""
    base = torch.randn(3, device="cuda")
    weight = torch.nn.Parameter(base)
    model = packing.pack([weight, base])
    try:
        loss = (weight * weight).sum()
        with torch.no_grad():
            base.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    finally:
        model.close()


def test_a_tensor_whose_impl_has_a_cpp_weak_reference_is_moved_in_place(gpu):
    """The profiler, for one, keeps C++ weak references to tensors, which the swap refuses."""
    held = torch.nn.Parameter(torch.randn(8, device="cuda"))
    other = torch.nn.Parameter(torch.randn(8, device="cuda"))
    reference = torch._C._WeakTensorRef(held)
    impls = (held._cdata, other._cdata)
    values = (held.detach().clone(), other.detach().clone())
    model = packing.pack([held, other])
    try:
        region = model.snapshot.region()
        assert held._cdata == impls[0] and other._cdata != impls[1]
        assert inside(held, region) and inside(other, region)
        assert torch.equal(held, values[0]) and torch.equal(other, values[1])
        assert not reference.expired() and held._version == 0
    finally:
        model.close()
