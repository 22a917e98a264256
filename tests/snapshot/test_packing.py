"""The runtime's packing: recorded tensors become views of one snapshot, then of each restored copy.

A restore rebinds every tensor in one pass (PackedModel.rebind): in place with
`set_` where the device does not change, through a view where `set_` is
refused. Either way each tensor keeps its identity, its layout and what it
shares, and the emulated devices count its memory where it now lives.
"""

from __future__ import annotations

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
    tensors = [torch.nn.Parameter(torch.randn(100 * (i + 1))) for i in range(4)]
    for tensor in tensors:
        registry.mark(tensor)
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
