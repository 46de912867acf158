"""ZeroGPU: on a Hugging Face Space, functions that run the LLM are wrapped in `spaces.GPU`.

Import this module before anything imports torch: `spaces` must come first on a Space. Off a Space
it imports nothing and `on_gpu` returns the function unchanged.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

ON_SPACE = bool(os.environ.get("SPACE_ID"))
GPU_SECONDS = 120  # what one generation may hold the GPU for

spaces = None
if ON_SPACE:
    try:
        import spaces  # type: ignore[no-redef]
    except ImportError:
        spaces = None

F = TypeVar("F", bound=Callable)


def on_gpu(fn: F) -> F:
    """`spaces.GPU` on a ZeroGPU Space; the function itself anywhere else."""
    if spaces is not None:
        return spaces.GPU(duration=GPU_SECONDS)(fn)
    return fn
