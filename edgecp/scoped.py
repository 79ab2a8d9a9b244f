"""Settings of other libraries that edgecp changes only for the duration of its own work, then restores.

The library never prints and never changes another library's settings for the whole process: each context below
sets what it needs on entry and puts back exactly what was there on exit (nested uses and exceptions included).
The `edgecp` command configures its own process, in one place (`edgecp.cli`).

- bitsandbytes logs `MatMul8bitLt: inputs will be cast from {dtype} to float16 during quantization` at WARNING from
  the logger `bitsandbytes.autograd._functions` on every call of every 8-bit layer whose input is not fp16
  (bitsandbytes 0.50.2, `bitsandbytes/autograd/_functions.py` line 129): hundreds of lines per training step.
  It is a log record, not a warning, so a `warnings.filterwarnings` does not stop it: `quiet_libraries` around
  training, generation and planning.
- bitsandbytes, torchao and torch's `_pytree` log notices about optional kernels when they are imported (e.g.
  "Failed to load CPU gemm_4bit_forward from kernels-community", "Unable to import `torchao` Tensor objects");
  `kernels` (imported by bitsandbytes) warns "Skipping publisher trust check" when the Hub is offline. The
  notices logged while edgecp's modules are first imported are the importing program's to silence (the CLI does);
  those logged while edgecp works are quiet.
- diffusers and transformers draw progress bars and log notices while they load a model (`from_pretrained`):
  `progress_bars_off` with `quiet_libraries(("diffusers", "transformers"))`, as `model.base.quiet_loading` does.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

QUIET_LOGGERS = ("bitsandbytes", "torchao", "kernels", "torch.utils._pytree",
                 "diffusers.quantizers.torchao.torchao_quantizer")


@contextmanager
def quiet_libraries(names: tuple[str, ...] = QUIET_LOGGERS, level: int = logging.ERROR):
    """Within the block the loggers `names` (and their children that set no level of their own) log only `level`
    and above; on exit each gets back exactly the level it had (also after an exception)."""
    loggers = [logging.getLogger(n) for n in names]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.level < level:  # never lower a level the caller set higher
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, previous):
            lg.setLevel(lvl)


@contextmanager
def progress_bars_off(*libraries):
    """Within the block the progress bars of each library given are off; on exit each one that was on is switched
    on again, and one that was off stays off. A library here is a `utils.logging` module with diffusers' and
    transformers' interface (`is_progress_bar_enabled`, `enable_progress_bar`, `disable_progress_bar`); passed in,
    so that this module imports neither."""
    was_on = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in zip(libraries, was_on):
            if on:
                lib.enable_progress_bar()
