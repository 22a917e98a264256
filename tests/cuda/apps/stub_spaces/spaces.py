"""What `import spaces` gives off ZeroGPU in the plain run: GPU returns the function unchanged."""


def GPU(task=None, **kwargs):
    return task if callable(task) else (lambda function: function)
