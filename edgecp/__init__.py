"""edgecp: continual personalization runtime for text-to-image diffusion models."""

import logging as _logging

__version__ = "0.1.0"

# The library never prints. diffusers and transformers import torchao and bitsandbytes when they are installed, and
# those log notices about optional kernels at import time; keep them out of the user's terminal.
for _name in ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
