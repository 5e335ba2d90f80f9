"""Quiet third-party logging, for entry points: stderr is for the user's errors.

::

    from blob_pyro.logs import quiet_library_logs
    quiet_library_logs()          # first thing in a script or notebook, before PEFT is imported

The library itself configures no logger at import; the CLI, the grid runner and the notebooks call this.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_library_logs"]


class _OncePerMessage(logging.Filter):
    """Let each distinct message through once (bitsandbytes logs one notice per forward of every 8-bit layer)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_ONCE = _OncePerMessage()


def quiet_library_logs() -> None:
    """Keep stderr for the user's errors: library chatter off, before PEFT (and bitsandbytes) is imported.

    With bitsandbytes installed, importing PEFT logs two warnings on CPUs with AVX512-BF16 (an optional 4-bit
    CPU kernel cannot be fetched offline), and every 8-bit layer logs an input-cast notice per forward.
    """
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_ONCE)  # adding it again is a no-op
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
