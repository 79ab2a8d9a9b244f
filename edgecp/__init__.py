"""edgecp: continual personalization runtime for text-to-image diffusion models.

The library never prints and sets nothing for the whole process at import: the notices that torchao and
bitsandbytes log are kept out of the terminal only while edgecp trains, generates or plans
(`edgecp.scoped.quiet_libraries`), and the `edgecp` command sets them for its own process (`cli._cli_process`).
"""

__version__ = "0.1.0"
