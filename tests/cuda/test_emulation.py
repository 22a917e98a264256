"""CUDA emulation: 'cuda' tensors that keep their data on the CPU and report cuda:0."""

from __future__ import annotations

import gc
import io
import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerogpu.cuda import emulation, torch_cuda, torch_mode
from zerogpu.errors import CudaInitialized, InvalidArgument

CUDA0 = torch.device("cuda", 0)
MISMATCH = (
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"
)


def forget_marks() -> None:
    for tensor in emulation.live_tensors():
        emulation.unmark(tensor)


@pytest.fixture
def emulated():
    """torch patched for the test only; every mark is forgotten afterwards."""
    emulation.patch()
    try:
        yield emulation
    finally:
        emulation.unpatch()
        forget_marks()
    assert not emulation.is_patched()


def assert_emulated(tensor: torch.Tensor) -> None:
    assert emulation.is_cuda(tensor)
    assert tensor.device == CUDA0
    assert tensor.is_cuda
    assert not tensor.is_cpu
    assert tensor.get_device() == 0
    with torch._C.DisableTorchFunction():
        assert tensor.device.type == "cpu", "the data must stay on the CPU"


def assert_plain_cpu(tensor: torch.Tensor) -> None:
    assert not emulation.is_cuda(tensor)
    assert tensor.device == torch.device("cpu")
    assert not tensor.is_cuda
    assert tensor.get_device() == -1


# --- moving tensors ---------------------------------------------------------

TENSOR_MOVES = {
    "cuda()": lambda t: t.cuda(),
    "cuda(0)": lambda t: t.cuda(0),
    "cuda('cuda:0')": lambda t: t.cuda("cuda:0"),
    "cuda(device=...)": lambda t: t.cuda(device=torch.device("cuda"), non_blocking=True),
    "to('cuda')": lambda t: t.to("cuda"),
    "to('cuda:0')": lambda t: t.to("cuda:0"),
    "to(0)": lambda t: t.to(0),
    "to(torch.device('cuda'))": lambda t: t.to(torch.device("cuda")),
    "to(torch.device('cuda', 0))": lambda t: t.to(torch.device("cuda", 0)),
    "to(device='cuda')": lambda t: t.to(device="cuda"),
    "to('cuda', non_blocking=True)": lambda t: t.to("cuda", non_blocking=True),
    "to('cuda', copy=True)": lambda t: t.to("cuda", copy=True),
    "type('torch.cuda.FloatTensor')": lambda t: t.type("torch.cuda.FloatTensor"),
}


@pytest.mark.parametrize("move", TENSOR_MOVES.values(), ids=TENSOR_MOVES.keys())
def test_tensor_moves_to_emulated_cuda_as_a_copy(emulated, move):
    source = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    moved = move(source)

    assert_emulated(moved)
    assert torch.equal(moved.cpu(), source)
    assert_plain_cpu(source)
    moved.add_(1)
    assert torch.equal(source, torch.arange(6, dtype=torch.float32).reshape(2, 3)), (
        "the 'cuda' tensor must be a copy, as it would be on a GPU"
    )


def test_to_cuda_with_dtype_and_to_another_tensor(emulated):
    source = torch.arange(4, dtype=torch.float32)
    half = source.to("cuda", torch.float16)
    assert_emulated(half)
    assert half.dtype == torch.float16

    like = torch.zeros(1, dtype=torch.float64, device="cuda")
    converted = source.to(like)
    assert_emulated(converted)
    assert converted.dtype == torch.float64
    typed = source.type_as(like)
    assert_emulated(typed)
    assert typed.dtype == torch.float64


def test_moving_an_emulated_tensor_to_cuda_again_returns_it(emulated):
    moved = torch.ones(3).cuda()
    assert moved.to("cuda") is moved
    assert moved.cuda() is moved
    assert moved.to(torch.float32) is moved


def test_a_view_moved_to_cuda_does_not_share_memory_with_its_base(emulated):
    base = torch.zeros(4, 4)
    moved = base[1].to("cuda")
    moved.fill_(7)
    assert base.sum() == 0


CPU_MOVES = {
    "cpu()": lambda t: t.cpu(),
    "to('cpu')": lambda t: t.to("cpu"),
    "to(torch.device('cpu'))": lambda t: t.to(torch.device("cpu")),
    "to(device='cpu')": lambda t: t.to(device="cpu"),
    "to(cpu_tensor)": lambda t: t.to(torch.zeros(2)),
    "as_tensor(device='cpu')": lambda t: torch.as_tensor(t, device="cpu"),
    "type('torch.FloatTensor')": lambda t: t.type("torch.FloatTensor"),
}


@pytest.mark.parametrize("move", CPU_MOVES.values(), ids=CPU_MOVES.keys())
def test_moving_to_the_cpu_gives_an_unmarked_copy(emulated, move):
    on_cuda = torch.arange(3, dtype=torch.float32, device="cuda")
    on_cpu = move(on_cuda)

    assert_plain_cpu(on_cpu)
    assert_emulated(on_cuda)
    on_cpu.add_(10)
    assert torch.equal(on_cuda.cpu(), torch.arange(3, dtype=torch.float32))


# --- factories --------------------------------------------------------------

FACTORIES = {
    "zeros": lambda d: torch.zeros(2, 3, device=d),
    "ones": lambda d: torch.ones(2, device=d),
    "empty": lambda d: torch.empty(5, device=d),
    "full": lambda d: torch.full((2,), 3.5, device=d),
    "arange": lambda d: torch.arange(4, device=d),
    "linspace": lambda d: torch.linspace(0, 1, 5, device=d),
    "eye": lambda d: torch.eye(3, device=d),
    "rand": lambda d: torch.rand(3, device=d),
    "randn": lambda d: torch.randn(3, device=d),
    "randint": lambda d: torch.randint(0, 10, (3,), device=d),
    "tensor": lambda d: torch.tensor([1.0, 2.0], device=d),
    "as_tensor(list)": lambda d: torch.as_tensor([1, 2], device=d),
    "zeros_like(cpu)": lambda d: torch.zeros_like(torch.ones(2), device=d),
    "new_zeros(cpu)": lambda d: torch.ones(2).new_zeros(3, device=d),
    "empty_strided": lambda d: torch.empty_strided((2, 2), (2, 1), device=d),
}
DEVICES = {
    "'cuda'": "cuda",
    "'cuda:0'": "cuda:0",
    "0": 0,
    "torch.device('cuda')": torch.device("cuda"),
}


@pytest.mark.parametrize("device", DEVICES.values(), ids=DEVICES.keys())
@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_factories_with_a_cuda_device_make_emulated_tensors(emulated, factory, device):
    assert_emulated(factory(device))


def test_factories_without_a_device_stay_on_the_cpu(emulated):
    assert_plain_cpu(torch.zeros(2))
    assert_plain_cpu(torch.zeros(2, device="cpu"))
    assert_plain_cpu(torch.zeros(2, device=None))


def test_as_tensor_to_cuda_copies_a_cpu_tensor(emulated):
    source = torch.zeros(3)
    moved = torch.as_tensor(source, device="cuda")
    assert_emulated(moved)
    assert_plain_cpu(source)
    moved.fill_(1)
    assert source.sum() == 0


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_like_and_new_factories_follow_an_emulated_tensor(emulated):
    on_cuda = torch.ones(2, 2, device="cuda")
    for made in (
        torch.zeros_like(on_cuda),
        torch.empty_like(on_cuda),
        torch.randn_like(on_cuda),
        on_cuda.new_zeros(3),
        on_cuda.new_tensor([1, 2]),
        on_cuda.new_tensor(torch.ones(2)),
        on_cuda.new_full((2,), 4.0),
    ):
        assert_emulated(made)
    assert_plain_cpu(torch.zeros_like(on_cuda, device="cpu"))


def test_torch_device_context_and_default_device(emulated):
    with torch.device("cuda"):
        made = torch.zeros(2)
        layer = torch.nn.Linear(2, 2)
    assert_emulated(made)
    assert_emulated(layer.weight)
    assert_emulated(layer.bias)
    assert_plain_cpu(torch.zeros(2))

    torch.set_default_device("cuda")
    try:
        assert_emulated(torch.ones(2))
        assert_emulated(torch.tensor([1, 2]))
    finally:
        torch.set_default_device(None)
    assert_plain_cpu(torch.ones(2))


# --- ops on emulated tensors ------------------------------------------------

OPS = {
    "add": lambda x, y: x + y,
    "mul scalar": lambda x, y: x * 3,
    "matmul": lambda x, y: x @ y.T,
    "linear": lambda x, y: torch.nn.functional.linear(x, y),
    "softmax": lambda x, y: torch.softmax(x, dim=-1),
    "sum": lambda x, y: x.sum(),
    "view": lambda x, y: x.view(-1),
    "transpose": lambda x, y: x.T,
    "slice": lambda x, y: x[:, 1:],
    "index cpu tensor": lambda x, y: x[torch.tensor([0, 1])],
    "index emulated tensor": lambda x, y: x[torch.tensor([1], device="cuda")],
    "cat": lambda x, y: torch.cat([x, y]),
    "stack": lambda x, y: torch.stack((x, y)),
    "where": lambda x, y: torch.where(x > 2, x, y),
    "cpu 0-dim scalar": lambda x, y: x * torch.tensor(2.0),
    "clone": lambda x, y: x.clone(),
    "data": lambda x, y: x.data,
    "detach": lambda x, y: x.detach(),
    "contiguous": lambda x, y: x.T.contiguous(),
    "half": lambda x, y: x.half(),
    "masked_fill": lambda x, y: x.masked_fill(x > 2, 0.0),
}


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_ops_on_emulated_tensors_give_emulated_results_with_cpu_values(emulated, op):
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    y = torch.ones(2, 3)
    expected = op(x, y)

    result = op(x.cuda(), y.cuda())

    assert_emulated(result)
    assert torch.equal(result.cpu(), expected)


def test_ops_returning_several_tensors_mark_each(emulated):
    x = torch.arange(6.0, device="cuda").reshape(2, 3)
    for part in x.split(1):
        assert_emulated(part)
    for row in x:
        assert_emulated(row)
    values, indices = x.max(dim=1)
    assert_emulated(values)
    assert_emulated(indices)
    assert x.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert x.sum().item() == 15.0


def test_in_place_ops_keep_the_mark(emulated):
    x = torch.zeros(3, device="cuda")
    assert x.add_(1) is x
    x[0] = 5.0
    x[1:] = torch.tensor([2.0, 3.0])
    x.copy_(x * 2)
    assert_emulated(x)
    assert x.tolist() == [10.0, 4.0, 6.0]


def test_copies_between_devices_are_allowed(emulated):
    on_cuda = torch.zeros(3, device="cuda")
    on_cpu = torch.arange(3.0)
    on_cuda.copy_(on_cpu)
    assert_emulated(on_cuda)
    target = torch.zeros(3)
    target.copy_(on_cuda * 2)
    assert_plain_cpu(target)
    assert target.tolist() == [0.0, 2.0, 4.0]


MIXES = {
    "add": lambda c, p: c + p,
    "radd": lambda c, p: p + c,
    "matmul": lambda c, p: p @ c,
    "cat": lambda c, p: torch.cat([c, p]),
    "linear": lambda c, p: torch.nn.functional.linear(p, c),
    "embedding": lambda c, p: torch.nn.functional.embedding(torch.tensor([0, 1]), c),
    "where": lambda c, p: torch.where(p > 0, c, c),
    "in-place on cpu": lambda c, p: p.add_(c),
    "cuda 0-dim with cpu": lambda c, p: p * c.sum(),
}


@pytest.mark.parametrize("mix", MIXES.values(), ids=MIXES.keys())
def test_mixing_emulated_and_cpu_tensors_raises_like_torch(emulated, mix):
    on_cuda = torch.ones(2, 2, device="cuda")
    on_cpu = torch.ones(2, 2)

    with pytest.raises(RuntimeError) as raised:
        mix(on_cuda, on_cpu)

    assert str(raised.value) == MISMATCH
    assert torch.equal(on_cpu, torch.ones(2, 2)), "nothing may run before the error"


def test_a_cpu_scalar_handed_back_by_an_op_stays_on_the_cpu(emulated):
    scalar = torch.tensor(2.0)
    assert scalar.type_as(torch.ones(1, device="cuda")) is not scalar
    assert_plain_cpu(scalar)
    assert_plain_cpu(torch.ones(1) * scalar)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_emulated_ops_compute_what_the_cpu_computes(shape, dtype, seed):
    emulation.patch()
    try:
        generator = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=generator) * 10).to(dtype)
        y = (torch.randn(shape, generator=generator) * 10).to(dtype)
        expected = (x * y + x).sum()
        moved_x, moved_y = x.to("cuda"), y.cuda()
        result = (moved_x * moved_y + moved_x).sum()
        assert_emulated(result)
        assert torch.equal(result.cpu(), expected)
        assert torch.equal(moved_x.cpu(), x)
    finally:
        emulation.unpatch()


# --- what emulated tensors report --------------------------------------------


def test_emulated_tensors_print_and_type_as_cuda(emulated):
    x = torch.tensor([1.0, 2.0], device="cuda")
    assert repr(x) == "tensor([1., 2.], device='cuda:0')"
    assert str(x) == repr(x)
    assert f"{x}" == repr(x)
    assert f"{x.sum():.1f}" == "3.0"
    assert repr(torch.nn.Parameter(x)) == (
        "Parameter containing:\ntensor([1., 2.], device='cuda:0', requires_grad=True)"
    )
    assert repr(torch.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert x.type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_emulated_tensors_refuse_numpy_like_cuda_tensors(emulated):
    x = torch.ones(2, device="cuda")
    message = "can't convert cuda:0 device type tensor to numpy"
    with pytest.raises(TypeError, match=message):
        x.numpy()
    with pytest.raises(TypeError, match=message):
        np.asarray(x)
    assert x.numpy(force=True).tolist() == [1.0, 1.0]
    assert x.cpu().numpy().tolist() == [1.0, 1.0]


def test_pinned_memory_is_emulated_by_plain_memory(emulated):
    source = torch.arange(3.0)
    pinned = source.pin_memory()
    assert_plain_cpu(pinned)
    assert torch.equal(pinned, source)
    assert_plain_cpu(torch.empty(2, pin_memory=True))
    assert_plain_cpu(torch.ones(2).new_empty(3, pin_memory=True))
    assert not pinned.is_pinned()
    assert_emulated(torch.zeros(2, pin_memory=True).to("cuda", non_blocking=True))
    with pytest.raises(RuntimeError, match="only dense CPU tensors can be pinned"):
        torch.ones(2, device="cuda").pin_memory()


# --- modules ------------------------------------------------------------------


class Tied(torch.nn.Module):
    """An embedding whose weight is also the output projection's, and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


MODULE_MOVES = {
    "to('cuda')": lambda m: m.to("cuda"),
    "to('cuda:0')": lambda m: m.to("cuda:0"),
    "to(0)": lambda m: m.to(0),
    "to(torch.device('cuda'))": lambda m: m.to(torch.device("cuda")),
    "to(device='cuda')": lambda m: m.to(device="cuda"),
    "to(emulated tensor)": lambda m: m.to(torch.zeros(1, device="cuda")),
    "cuda()": lambda m: m.cuda(),
    "cuda(0)": lambda m: m.cuda(0),
}


@pytest.mark.parametrize("move", MODULE_MOVES.values(), ids=MODULE_MOVES.keys())
def test_module_moves_keep_parameters_buffers_and_ties(emulated, move):
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.tensor([[1, 2, 3]]).view(-1)
    expected = model(ids)
    weight = model.embed.weight

    assert move(model) is model

    assert model.embed.weight is weight, "parameters keep their Python objects, as in torch"
    assert model.head.weight is model.embed.weight
    for tensor in [*model.parameters(), *model.buffers()]:
        assert_emulated(tensor)
    assert len(list(model.parameters())) == 3
    result = model(ids.cuda())
    assert_emulated(result)
    assert torch.equal(result.cpu(), expected)


def test_module_to_with_a_dtype_and_back_to_the_cpu(emulated):
    model = torch.nn.Linear(3, 2).to("cuda", torch.float64)
    assert_emulated(model.weight)
    assert model.weight.dtype == torch.float64
    model.cpu()
    assert_plain_cpu(model.weight)
    assert_plain_cpu(model.bias)


def test_module_moves_with_swapped_parameters(emulated):
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = torch.nn.Linear(2, 2)
        weight = model.weight
        model.to("cuda")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert model.weight is weight
    assert_emulated(model.weight)


def test_parameters_made_from_emulated_tensors_are_emulated(emulated):
    assert_emulated(torch.nn.Parameter(torch.zeros(2, device="cuda")))
    assert_emulated(torch.nn.Buffer(torch.zeros(2, device="cuda")))
    assert_plain_cpu(torch.nn.Parameter(torch.zeros(2)))


def test_module_to_empty_on_cuda(emulated):
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    model.to_empty(device="cuda")
    assert_emulated(model.weight)


@pytest.mark.slow
def test_training_step_keeps_gradients_and_parameters_on_cuda(emulated):
    torch.manual_seed(0)
    layers = torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(*layers).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().cpu() for p in model.parameters()]

    loss = model(torch.randn(5, 3, device="cuda")).pow(2).mean()
    loss.backward()
    optimizer.step()

    for parameter, old in zip(model.parameters(), before):
        assert_emulated(parameter)
        assert_emulated(parameter.grad)
        assert not torch.equal(parameter.detach().cpu(), old)


@pytest.mark.slow
def test_a_small_transformers_model_runs_as_on_the_cpu(emulated):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        expected = reference(ids).logits

    model = transformers.GPT2LMHeadModel(config).eval()
    model.load_state_dict(reference.state_dict())
    assert model.to("cuda") is model

    assert model.device == CUDA0
    assert model.lm_head.weight is model.transformer.wte.weight
    for tensor in [*model.parameters(), *model.buffers()]:
        assert_emulated(tensor)
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits
    assert_emulated(logits)
    assert torch.equal(logits.cpu(), expected)
    with pytest.raises(RuntimeError, match="found at least two devices"):
        model(ids)


# --- loading weights ------------------------------------------------------------


def saved_checkpoint(location: str | None = None) -> io.BytesIO:
    """A torch.save file of a tensor, a view of it and a Parameter, its storages tagged `location`.

    A file saved from GPU tensors tags their storages 'cuda:0'; there is no
    GPU here to save from, so the tag is set as torch.save writes it.
    """
    buffer = io.BytesIO()
    base = torch.arange(6.0)
    checkpoint = {"base": base, "view": base[2:], "parameter": torch.nn.Parameter(torch.ones(2))}
    original = torch.serialization.location_tag
    if location is not None:
        torch.serialization.location_tag = lambda storage: location
    try:
        torch.save(checkpoint, buffer)
    finally:
        torch.serialization.location_tag = original
    buffer.seek(0)
    return buffer


LOCATIONS = {
    "'cuda'": "cuda",
    "'cuda:0'": "cuda:0",
    "torch.device('cuda')": torch.device("cuda"),
    "{'cpu': 'cuda:0'}": {"cpu": "cuda:0"},
}


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("map_location", LOCATIONS.values(), ids=LOCATIONS.keys())
def test_torch_load_to_cuda_gives_emulated_tensors(emulated, map_location, weights_only):
    loaded = torch.load(saved_checkpoint(), map_location=map_location, weights_only=weights_only)

    for tensor in loaded.values():
        assert_emulated(tensor)
    assert isinstance(loaded["parameter"], torch.nn.Parameter)
    assert loaded["view"].tolist() == [2.0, 3.0, 4.0, 5.0]
    view, base = loaded["view"].untyped_storage(), loaded["base"].untyped_storage()
    assert view.data_ptr() == base.data_ptr()


def test_torch_load_of_a_gpu_checkpoint(emulated):
    for tensor in torch.load(saved_checkpoint("cuda:0")).values():
        assert_emulated(tensor)
    for tensor in torch.load(saved_checkpoint("cuda:0"), map_location="cpu").values():
        assert_plain_cpu(tensor)
    for tensor in torch.load(saved_checkpoint()).values():
        assert_plain_cpu(tensor)
    with pytest.raises(RuntimeError, match="invalid device ordinal: cuda:3"):
        torch.load(saved_checkpoint("cuda:3"))


def test_safetensors_load_to_cuda_gives_emulated_tensors(emulated, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "weights.safetensors"
    weights = {"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.bfloat16)}
    safetensors_torch.save_file(weights, path)

    loaded = safetensors_torch.load_file(path, device="cuda")

    for name, tensor in loaded.items():
        assert_emulated(tensor)
        assert torch.equal(tensor.cpu(), weights[name])


# --- .data and rebind ---------------------------------------------------------


def test_setting_data_moves_the_tensor_where_the_data_is(emulated):
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.data = torch.ones(2, device="cuda")
    assert_emulated(parameter)
    parameter.data = torch.ones(2)
    assert_plain_cpu(parameter)


def test_rebind_keeps_the_mark_unless_told(emulated):
    parameter = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    view = torch.arange(8.0)[::2]
    emulation.rebind(parameter, view)
    assert_emulated(parameter)
    assert parameter.data_ptr() == view.data_ptr()
    assert parameter.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert_plain_cpu(view)

    plain = torch.zeros(2)
    emulation.rebind(plain, torch.ones(2, device="cuda"))
    assert_emulated(plain)
    other = torch.zeros(2)
    emulation.rebind(other, torch.ones(2))
    assert_plain_cpu(other)

    emulation.rebind(other, torch.arange(2.0), mark=True)
    assert_emulated(other)
    assert other.tolist() == [0.0, 1.0]
    restored = torch.full((4,), 9.0)
    emulation.rebind(parameter, restored, mark=False)
    assert_plain_cpu(parameter)
    assert parameter.data_ptr() == restored.data_ptr()


def test_rebind_refuses_bad_arguments(emulated):
    parameter = torch.nn.Parameter(torch.zeros(2, device="cuda"))
    with pytest.raises(InvalidArgument, match="CPU tensor"):
        emulation.rebind(parameter, torch.zeros(2, device="meta"))
    with pytest.raises(InvalidArgument, match="CPU tensor"):
        emulation.rebind(torch.zeros(2), torch.zeros(2, device="meta"), mark=True)
    with pytest.raises(InvalidArgument, match="torch.Tensor"):
        emulation.rebind(parameter, [1.0, 2.0])
    with pytest.raises(InvalidArgument, match="torch.Tensor"):
        emulation.rebind("weights", torch.zeros(2))
    assert_emulated(parameter)
    assert parameter.tolist() == [0.0, 0.0]


# --- the registry ---------------------------------------------------------------


def test_mark_and_unmark(emulated):
    tensor = torch.zeros(2)
    emulation.mark(tensor)
    assert_emulated(tensor)
    assert any(live is tensor for live in emulation.live_tensors())
    emulation.unmark(tensor)
    assert_plain_cpu(tensor)
    emulation.unmark(tensor)
    assert not emulation.is_cuda("tensor")
    assert not emulation.is_cuda(None)


def test_mark_refuses_what_cannot_be_emulated(emulated):
    with pytest.raises(InvalidArgument, match="torch.Tensor"):
        emulation.mark([1, 2])
    with pytest.raises(InvalidArgument, match="CPU tensor"):
        emulation.mark(torch.zeros(2, device="meta"))
    with pytest.raises(InvalidArgument, match="device index 1"):
        emulation.mark(torch.zeros(2), 1)
    with pytest.raises(InvalidArgument, match="torch.Tensor"):
        emulation.unmark(3)


def test_the_registry_holds_tensors_weakly(emulated):
    kept = torch.ones(3, device="cuda")
    dropped = torch.ones(3, device="cuda")
    dropped_id = id(dropped)
    assert any(live is dropped for live in emulation.live_tensors())

    del dropped
    gc.collect()

    live = emulation.live_tensors()
    assert any(tensor is kept for tensor in live)
    assert all(id(tensor) != dropped_id for tensor in live)


def test_a_tensor_kept_alive_by_torch_alone_stays_marked(emulated):
    base = torch.ones(4, device="cuda")
    view = base.view(2, 2)
    del base
    gc.collect()
    assert_emulated(view._base)


def test_the_registry_lists_a_module_weights_once_each(emulated):
    model = Tied().cuda()
    live = {id(tensor) for tensor in emulation.live_tensors()}
    for tensor in [*model.parameters(), *model.buffers()]:
        assert id(tensor) in live


# --- threads ------------------------------------------------------------------


def test_threads_started_after_patch_see_the_emulation(emulated):
    def work() -> tuple[bool, str, bool]:
        made = torch.zeros(2, device="cuda")
        moved = torch.ones(2).to("cuda")
        return emulation.is_cuda(made), str((made + moved).device), torch.cuda.is_available()

    results = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    thread.join()
    with ThreadPoolExecutor(2) as pool:
        results.extend(pool.map(lambda _: work(), range(4)))

    assert results == [(True, "cuda:0", True)] * 5


def test_a_thread_lets_go_of_the_emulation_when_it_ends(emulated, monkeypatch):
    # Left on the stack, the mode would be released by the thread's C++
    # destructors, racing interpreter shutdown (an abort at exit).
    released = []
    leave_mode = torch_mode.leave_mode

    def recording_leave_mode() -> None:
        leave_mode()
        released.append((threading.get_ident(), torch._C._len_torch_function_stack()))

    monkeypatch.setattr(torch_mode, "leave_mode", recording_leave_mode)
    thread = threading.Thread(target=lambda: torch.zeros(1, device="cuda"))
    thread.start()
    thread.join()

    assert released == [(thread.ident, 0)]


def run_in_a_thread_started_before_patch(work, name: str = "early-worker") -> None:
    """Start a thread, patch torch while it waits, then let it run `work`."""
    started, go = threading.Event(), threading.Event()

    def early() -> None:
        started.set()
        go.wait()
        work()

    thread = threading.Thread(target=early, name=name)
    thread.start()
    started.wait()
    emulation.patch()
    try:
        go.set()
        thread.join()
    finally:
        emulation.unpatch()


def test_a_thread_started_before_patch_is_told_why_cuda_fails():
    errors = []

    def work() -> None:
        try:
            torch.zeros(1, device="cuda")
        except Exception as error:  # noqa: BLE001 - the test inspects it
            errors.append(error)

    run_in_a_thread_started_before_patch(work)

    assert len(errors) == 1
    assert isinstance(errors[0], CudaInitialized)
    assert "early-worker" in str(errors[0])
    assert "started before zerogpu patched torch" in str(errors[0])


def test_activate_brings_the_emulation_to_a_thread_started_before_patch():
    results = []

    def work() -> None:
        emulation.activate()
        made = torch.zeros(2, device="cuda")
        results.append((emulation.is_cuda(made), str(made.device)))

    try:
        run_in_a_thread_started_before_patch(work)
    finally:
        forget_marks()
    assert results == [(True, "cuda:0")]


def test_activate_needs_a_patched_process():
    with pytest.raises(InvalidArgument, match="call zerogpu.cuda.emulation.patch"):
        emulation.activate()


def test_suspended_shows_the_data_as_it_is(emulated):
    weights = torch.ones(3, device="cuda")
    with emulation.suspended():
        assert weights.device == torch.device("cpu")
        assert not emulation.is_cuda(weights.data)
        assert not emulation.is_cuda(weights * 2)
        with pytest.raises(CudaInitialized) as raised:
            torch.zeros(1, device="cuda")
        assert "started before zerogpu patched torch" not in str(raised.value)
        seen_by_others = []
        thread = threading.Thread(target=lambda: seen_by_others.append(str(weights.device)))
        thread.start()
        thread.join()
        assert seen_by_others == ["cuda:0"]
    assert_emulated(weights)
    assert_emulated(weights * 2)


# --- torch.cuda queries -------------------------------------------------------


def test_torch_cuda_queries_answer_from_the_default_device_info(emulated):
    info = emulation.DeviceInfo()
    assert torch.cuda.is_available()
    assert torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    assert torch.cuda.get_device_name() == info.name == "zerogpu emulated GPU"
    assert torch.cuda.get_device_name(0) == info.name
    assert torch.cuda.get_device_capability() == (9, 0)
    properties = torch.cuda.get_device_properties(torch.device("cuda"))
    assert (properties.name, properties.major, properties.minor) == (info.name, 9, 0)
    assert properties.total_memory == 80 * 2**30
    assert properties.multi_processor_count == 132
    assert torch.cuda.mem_get_info() == (80 * 2**30, 80 * 2**30)
    assert torch.cuda.memory.mem_get_info is torch.cuda.mem_get_info
    assert torch.cuda.synchronize() is None
    assert torch.cuda.synchronize(0) is None
    assert torch.cuda.empty_cache() is None
    assert torch.cuda.set_per_process_memory_fraction(0.5) is None
    assert not torch.cuda.is_initialized()


def test_torch_cuda_queries_validate_their_arguments_like_torch(emulated):
    with pytest.raises(ValueError, match="Expected a cuda device, but got: cpu"):
        torch.cuda.synchronize("cpu")
    with pytest.raises(AssertionError, match="Invalid device id"):
        torch.cuda.get_device_properties(1)
    with pytest.raises(TypeError, match="must be `float`"):
        torch.cuda.set_per_process_memory_fraction(1)
    with pytest.raises(ValueError, match="Allowed range: 0~1"):
        torch.cuda.set_per_process_memory_fraction(1.5)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.zeros(1, device="cuda:1")


def test_mem_get_info_counts_the_emulated_tensors(emulated):
    free, total = torch.cuda.mem_get_info()
    weights = torch.empty(1024, 1024, device="cuda")
    alias = weights.view(-1)
    assert torch.cuda.mem_get_info() == (free - 4 * 2**20, total)
    del weights, alias
    gc.collect()
    assert torch.cuda.mem_get_info() == (free, total)


def test_manual_seed_makes_emulated_randomness_repeatable(monkeypatch):
    # torch's own manual_seed queues the seed for the real generators until a
    # worker initializes CUDA; it must still be called, whatever it is then.
    queued = []

    def queue(seed: int) -> None:
        queued.append(seed)

    monkeypatch.setattr(torch.cuda, "manual_seed", queue)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", queue)
    emulation.patch()
    try:
        torch.cuda.manual_seed(1234)
        first = torch.randn(4, device="cuda")
        torch.cuda.manual_seed_all(1234)
        second = torch.randn(4, device="cuda")
    finally:
        emulation.unpatch()

    assert torch.equal(first, second)
    assert queued == [1234, 1234]
    assert torch.cuda.manual_seed is queue
    assert not torch.cuda.is_initialized()


def test_a_custom_device_info_with_two_devices():
    info = emulation.DeviceInfo(
        name="Test GPU", total_memory=2**30, major=8, minor=6, multi_processor_count=10, count=2
    )
    emulation.patch(info)
    try:
        assert torch.cuda.device_count() == 2
        assert torch.cuda.get_device_name(1) == "Test GPU"
        assert torch.cuda.get_device_capability(1) == (8, 6)
        assert torch.cuda.mem_get_info(1) == (2**30, 2**30)

        first = torch.ones(2, device="cuda")
        second = torch.ones(2).to("cuda:1")
        assert first.device == torch.device("cuda", 0)
        assert second.device == torch.device("cuda", 1)
        assert second.get_device() == 1
        assert repr(second) == "tensor([1., 1.], device='cuda:1')"
        assert (second * 2).device == torch.device("cuda", 1)
        moved = first.to("cuda:1")
        assert moved is not first and moved.device == torch.device("cuda", 1)
        with pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cuda:1!"):
            first + second

        with torch.cuda.device(1):
            assert torch.cuda.current_device() == 1
            assert torch.zeros(1, device="cuda").device == torch.device("cuda", 1)
        assert torch.cuda.current_device() == 0
        torch.cuda.set_device(1)
        assert torch.ones(1).cuda().device == torch.device("cuda", 1)
        torch.cuda.set_device(0)
        with pytest.raises(RuntimeError, match="invalid device ordinal: cuda:2"):
            torch.zeros(1, device="cuda:2")
    finally:
        emulation.unpatch()


# --- patch and unpatch ------------------------------------------------------------


def test_device_info_refuses_bad_values():
    with pytest.raises(InvalidArgument, match="count must be an integer of at least 1"):
        emulation.DeviceInfo(count=0)
    with pytest.raises(InvalidArgument, match="total_memory"):
        emulation.DeviceInfo(total_memory=-1)
    with pytest.raises(InvalidArgument, match="name"):
        emulation.DeviceInfo(name="")


def test_patch_refuses_bad_arguments():
    with pytest.raises(InvalidArgument, match="DeviceInfo"):
        emulation.patch("H100")
    assert not emulation.is_patched()
    emulation.patch()
    try:
        with pytest.raises(InvalidArgument, match="already patched"):
            emulation.patch(emulation.DeviceInfo(count=2))
    finally:
        emulation.unpatch()


def test_patch_fails_when_cuda_was_initialized_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    original = torch.cuda.is_available

    with pytest.raises(CudaInitialized) as raised:
        emulation.patch()

    message = str(raised.value)
    assert "CUDA was initialized in this process before zerogpu patched torch" in message
    assert "Import zerogpu before anything that uses CUDA" in message
    assert "zerogpu run" in message
    assert not emulation.is_patched()
    assert torch.cuda.is_available is original
    assert torch._C._len_torch_function_stack() == 0


def patched_attributes() -> dict[tuple[int, str], tuple[bool, object]]:
    """Every attribute patch() replaces, as (present, value) before any patch."""
    owners = [
        torch._C,
        torch.Tensor,
        torch.utils,
        torch._utils,
        threading.Thread,
        *torch_cuda.CUDA_MODULES,
    ]
    names = [
        "_cuda_init",
        "_make_subclass",
        "swap_tensors",
        "_bootstrap_inner",
        "_rebuild_tensor",
        "_rebuild_tensor_v3",
        *torch_cuda.CUDA_FUNCTIONS,
        *torch_cuda.CUDA_WRAPPERS,
    ]
    attributes = {
        (id(owner), name): (name in vars(owner), vars(owner).get(name))
        for owner in owners
        for name in names
    }
    attributes[(id(torch.serialization), "_package_registry")] = (
        True,
        tuple(torch.serialization._package_registry),
    )
    return attributes


def test_unpatch_restores_torch_exactly():
    before = patched_attributes()
    stack_before = torch._C._len_torch_function_stack()
    is_available = torch.cuda.is_available

    emulation.patch()
    emulation.patch()
    assert emulation.is_patched()
    assert torch._C._len_torch_function_stack() == stack_before + 1, "patch() is idempotent"
    assert patched_attributes() != before
    marked = torch.ones(2, device="cuda")
    emulation.unpatch()
    emulation.unpatch()

    assert not emulation.is_patched()
    assert patched_attributes() == before
    assert torch.cuda.is_available is is_available
    assert "_make_subclass" not in vars(torch.Tensor)
    assert torch._C._len_torch_function_stack() == stack_before
    assert torch.cuda.is_available() == is_available()
    assert marked.device == torch.device("cpu")
    assert repr(marked) == "tensor([1., 1.])"
    # A worker on the real cuda backend unpatches, then moves what was recorded.
    assert emulation.is_cuda(marked)
    assert any(tensor is marked for tensor in emulation.live_tensors())
    forget_marks()


def test_unpatch_keeps_modes_pushed_after_patch(emulated):
    class Outer(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    outer = Outer()
    with outer:
        emulation.unpatch()
        stack = torch.overrides._get_current_function_mode_stack()
        assert stack == [outer]
        emulation.patch()


def test_cuda_calls_that_are_not_emulated_raise_cuda_initialized(emulated):
    with pytest.raises(CudaInitialized) as raised:
        torch.cuda.ipc_collect()
    message = str(raised.value)
    assert "torch.cuda.ipc_collect()" in message
    assert "test_emulation.py" in message
    assert "@zerogpu.GPU" in message
    with pytest.raises(CudaInitialized):
        torch.cuda.init()
    with pytest.raises(CudaInitialized):
        torch._C._cuda_init()
    assert not torch.cuda.is_initialized()


NO_CONTEXT_SCRIPT = textwrap.dedent(
    """
    import json, threading
    import torch
    from zerogpu.cuda import emulation

    emulation.patch()
    import torch._dynamo  # checks the signature of what replaced Tensor._make_subclass
    reached = []
    refuse_lazy_init, refuse_cuda_init = torch.cuda._lazy_init, torch._C._cuda_init

    def spy(name, refuse):
        def called(*args, **kwargs):
            reached.append(name)
            return refuse(*args, **kwargs)
        return called

    torch.cuda._lazy_init = spy("torch.cuda._lazy_init", refuse_lazy_init)
    torch._C._cuda_init = spy("torch._C._cuda_init", refuse_cuda_init)

    def workload():
        x = torch.ones(3)
        moved = [x.cuda(), x.cuda(0), x.to("cuda"), x.to("cuda:0"), x.to(0),
                 x.to(torch.device("cuda")), x.to(device="cuda"), x.to("cuda", torch.half)]
        made = [torch.zeros(2, device="cuda"), torch.randn(2, device=0),
                torch.tensor([1], device=torch.device("cuda")), torch.ones_like(x, device="cuda")]
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        model.to("cuda"); model.cuda(); model.to(0); model.to(torch.device("cuda", 0))
        out = model(torch.randn(4, 3, device="cuda"))
        out.sum().backward()
        repr(out); out.cpu(); torch.cuda.synchronize()
        with torch.device("cuda"):
            torch.nn.Linear(2, 2)
        queries = [torch.cuda.is_available(), torch.cuda.device_count(),
                   torch.cuda.current_device(), torch.cuda.get_device_name(),
                   str(torch.cuda.get_device_properties(0)),
                   torch.cuda.get_device_capability(), torch.cuda.mem_get_info()]
        torch.cuda.manual_seed(0); torch.cuda.manual_seed_all(0)
        torch.cuda.set_per_process_memory_fraction(0.5); torch.cuda.empty_cache()
        with torch.cuda.device(0):
            torch.zeros(1, device="cuda")
        emulated = all(emulation.is_cuda(t) for t in moved + made + [out, *model.parameters()])
        return emulated and queries[:3] == [True, 1, 0]

    results = [workload()]
    thread = threading.Thread(target=lambda: results.append(workload()))
    thread.start(); thread.join()
    print(json.dumps({"results": results, "reached": reached,
                      "initialized": torch.cuda.is_initialized()}))
    """
)


@pytest.mark.slow
def test_the_parent_never_initializes_cuda():
    """Everything above, in a fresh interpreter, never reaches CUDA initialization."""
    completed = subprocess.run(
        [sys.executable, "-c", NO_CONTEXT_SCRIPT], capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report == {"results": [True, True], "reached": [], "initialized": False}
