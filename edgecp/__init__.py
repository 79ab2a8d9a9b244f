"""edgecp: continual personalization runtime for text-to-image diffusion models.

The library never prints and sets nothing for the whole process: the notices that torchao and bitsandbytes log
are kept out of the terminal only while edgecp trains, generates or plans (`edgecp.scoped.quiet_libraries`), and
diffusers' and transformers' notices and progress bars only while a base loads
(`edgecp.model.base.quiet_loading`); each setting is restored afterwards. The `edgecp` command configures its own
process, in one place (`edgecp.cli`).
"""

__version__ = "0.1.0"
