"""One call, parent and worker sides: decorate, fork, run in the worker, return, keep warm (steps 3, 6-8)."""
