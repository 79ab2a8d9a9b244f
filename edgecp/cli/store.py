"""The store commands of `edgecp`: init (create a store), set-method (change its method while it holds no concept).

Registered on the main app by `register(app)`; each parses, calls ONE library function (edgecp/api.py) and renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgecp.cli.common import BudgetOpt, StoreOpt, err, out, parse_kv
from edgecp.config import DEFAULT_METHOD
from edgecp.render import esc

# the methods whose `remove-concept` is exact, named in `init --help` without importing them (torch); a test checks
# them against the method classes
EXACT_REMOVAL = ("lora-merge", "c-lora", "custom-diffusion", "textual-inversion")
FIXED_METHOD_NOTE = ("the method cannot change once the store holds a concept: `edgecp set-method` works only "
                     "before the first add-concept")


def init(
    store: Annotated[Path, typer.Argument(help="A new, empty folder for the store.")],
    base: Annotated[str, typer.Option(help="'tiny' (embedded), a diffusers folder, a .safetensors file, or a hub id.")] = "tiny",
    method: Annotated[Optional[str], typer.Option(
        help=f"How earlier concepts are kept while new ones are learned. Unsure: keep the default, {DEFAULT_METHOD} "
             "(about twice the training time of the plainest method, lora-sequential). To remove a concept exactly "
             f"later: {', '.join(EXACT_REMOVAL)}. Smallest: textual-inversion (learns only a word per concept). "
             "`edgecp methods` says what each does and costs. Fixed once the store holds a concept.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Method hyperparameter key=value (repeat).")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="lora or vera (default: the method's).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="Adapter rank (default 16).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated UNet module suffixes (default attn2.to_k,attn2.to_v).")] = None,
    train: Annotated[Optional[list[str]], typer.Option("--train", help="Training default key=value (steps, lr, resolution, grad_accum, ...).")] = None,
    prior_prompt: Annotated[Optional[str], typer.Option(help="The prior prompt c_0 for prior preservation.")] = None,
    prior_images: Annotated[Optional[int], typer.Option(help="How many prior images the base generates once.")] = None,
    memory_budget: BudgetOpt = None,
) -> None:
    """Create a store: one personal model on one base, with the method that keeps its earlier concepts (fixed once
    it holds a concept; `edgecp methods` compares them).

    Examples:
      edgecp init my-model --base tiny
      edgecp init my-model --base ./stable-diffusion-v1-5 --rank 16
    """
    # lazy: edgecp.api loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.api import init_store

    adapter_d: dict = {"kind": adapter} if adapter else {}
    if rank is not None:
        adapter_d.update(rank=rank, alpha=float(rank))
    if targets:
        adapter_d["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    prior = {k: v for k, v in (("prompt", prior_prompt), ("num_images", prior_images)) if v is not None}
    s = init_store(store, base, method or DEFAULT_METHOD, parse_kv(param, "--param"), adapter_d,
                   parse_kv(train, "--train"), prior, memory_budget=memory_budget)
    chosen = s.info["method"]["name"]
    why = " (the default; `edgecp methods` compares the others)" if method is None else ""
    out.print(f"created store [bold]{esc(s.root)}[/] on base '{esc(s.info['base']['locator'])}' "
              f"(sha256 {s.info['base']['sha256'][:12]}), method {chosen}{why}", soft_wrap=True)
    err.print(f"[yellow]note:[/] {FIXED_METHOD_NOTE}", highlight=False, soft_wrap=True)


def set_method_cmd(
    method: Annotated[str, typer.Argument(help="Continual strategy; see `edgecp methods`.")],
    store: StoreOpt,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Method hyperparameter key=value (repeat).")] = None,
) -> None:
    """Change the method of a store that holds no concepts yet.

    Examples:
      edgecp set-method dsc-ewc-dc --store my-model -p k=5 -p delta=0.5
    """
    # lazy: edgecp.api loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.api import set_method

    s = set_method(store, method, parse_kv(param, "--param"))
    out.print(f"store {esc(s.root)} now uses {s.info['method']['name']} {esc(s.info['method']['params'])}")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("set-method")(set_method_cmd)
