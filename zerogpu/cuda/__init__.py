"""The device side: CUDA emulation, device discovery, attach, the copy engine and restore (steps 4-5)."""
