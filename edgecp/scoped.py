"""Settings of other libraries that edgecp changes only for the duration of its own work, then restores.

The library never prints and never changes another library's settings for the whole process (issue 22):
`quiet_libraries()` replaces what `edgecp/__init__.py` used to do at import (set the torchao and bitsandbytes
loggers to ERROR for good). Around training, generation and planning the notices below are kept out of the
user's terminal, and the previous levels come back on exit (nested uses included).

- bitsandbytes logs `MatMul8bitLt: inputs will be cast from {dtype} to float16 during quantization` at WARNING from
  the logger `bitsandbytes.autograd._functions` on every call of every 8-bit layer whose input is not fp16
  (bitsandbytes 0.50.2, `bitsandbytes/autograd/_functions.py` line 129): hundreds of lines per training step.
  It is a log record, not a warning, so a `warnings.filterwarnings` (model/quant.py had one) does not stop it.
- bitsandbytes, torchao and torch's `_pytree` log notices about optional kernels when they are imported (e.g.
  "Failed to load CPU gemm_4bit_forward from kernels-community", "Unable to import `torchao` Tensor objects");
  `kernels` (imported by bitsandbytes) warns "Skipping publisher trust check" when the Hub is offline.
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
