"""The emulated device's random numbers: 'cuda' generators and torch.cuda's RNG state.

Emulated 'cuda' tensors are made on the CPU and draw from CPU generators, so
`torch.Generator(device="cuda")` is a CPU generator that reports its cuda
device, and torch.cuda's RNG state is that of the CPU default generator,
which is what the emulated device's ops draw from. Seeded alike, the numbers
are those a plain CPU run gives.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .emulated_devices import cuda_device, cuda_target, info


class _GeneratorType(type(torch._C.Generator)):  # type: ignore[misc]
    # Every generator is a torch.Generator, whichever class made it.
    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, torch._C.Generator)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, torch._C.Generator)


def generator_class(original: type) -> type:
    """torch.Generator, taking device='cuda' for the emulated device."""

    class Generator(original, metaclass=_GeneratorType):  # type: ignore[misc,valid-type]
        __doc__ = original.__doc__

        def __new__(cls, device: Any = "cpu") -> Any:
            index = cuda_target(device)
            if index is None:
                return original(device)
            generator = super().__new__(cls, "cpu")
            generator._zerogpu_index = index
            return generator

        @property
        def device(self) -> torch.device:
            return cuda_device(self._zerogpu_index)

        def __reduce__(self) -> Any:
            return (_emulated_generator, (self._zerogpu_index, self.get_state()))

    Generator.__module__ = "torch"
    Generator.__qualname__ = "Generator"
    return Generator


def _emulated_generator(index: int, state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator(device=f"cuda:{index}")
    generator.set_state(state)
    return generator


def get_rng_state(device: object = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def set_rng_state(new_state: torch.Tensor, device: object = "cuda") -> None:
    torch.default_generator.set_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state() for _ in range(info().count)]


def set_rng_state_all(new_states: list[torch.Tensor]) -> None:
    for state in new_states[:1]:
        set_rng_state(state)


def seed() -> None:
    torch.default_generator.seed()


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


RANDOM_FUNCTIONS: dict[str, Callable] = {
    "get_rng_state": get_rng_state,
    "set_rng_state": set_rng_state,
    "get_rng_state_all": get_rng_state_all,
    "set_rng_state_all": set_rng_state_all,
    "seed": seed,
    "seed_all": seed,
    "initial_seed": initial_seed,
}
