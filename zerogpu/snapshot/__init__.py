"""Shared-memory segments and snapshots, and packing the recorded tensors into one (step 1)."""
