"""The lifecycle commands of `edgecp`: history, rollback, remove-concept, verify, gc (library: edgecp/lifecycle.py).

Registered on the main app by `register(app)`; each parses, calls ONE library function and renders.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgecp.cli.common import JsonOpt, StoreOpt
from edgecp.render import esc

out = Console(soft_wrap=True)  # long paths stay on one line
err = Console(stderr=True, soft_wrap=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,} B"


def history_cmd(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """The store's versions: what each did, when, with which method, how many bytes; HEAD marked.

    Examples:
      edgecp history --store my-model
      edgecp history --store my-model --json
    """
    # lazy: edgecp.lifecycle loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.lifecycle import history

    h = history(store)
    if as_json:
        out.print_json(json.dumps(h))
        return
    t = Table(title=f"{esc(h['store'])} - HEAD {h['head'] or '(damaged)'} - {_mb(h['bytes'])} in versions")
    for col in ("", "version", "parent", "committed", "what", "method", "concepts", "bytes"):
        t.add_column(col)
    for r in h["versions"]:
        mark = "HEAD" if r["head"] else ""
        if r.get("damaged"):
            t.add_row(mark, r["version"], "?", "?", "[red]damaged: run edgecp verify[/]", "", "", _mb(r["bytes"]))
            continue
        t.add_row(mark, r["version"], r["parent"] or "-", r["committed"] or "-", esc(r["what"]), r["method"],
                  esc(", ".join(r["concepts"]) or "-"), _mb(r["bytes"]))
    out.print(t)
    for e in h["events"]:
        if e.get("action") == "gc":
            out.print(f"{e.get('time', '')}  gc deleted {', '.join(e.get('deleted', [])) or 'no version'}")
        else:
            what = f"remove-concept {esc(e.get('concept'))} --mode rollback: " if e.get("action") == "remove-concept" else ""
            out.print(f"{e.get('time', '')}  {what}HEAD {e.get('from')} -> {e.get('to')}")


def rollback_cmd(
    version: Annotated[str, typer.Argument(help="The version to make current, e.g. v0003 (see `edgecp history`).")],
    store: StoreOpt,
) -> None:
    """Point HEAD at an earlier (or later) version, atomically; the versions above it stay until `edgecp gc`.

    Examples:
      edgecp rollback v0003 --store my-model
    """
    # lazy: edgecp.lifecycle loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.lifecycle import rollback

    r = rollback(store, version)
    out.print(f"HEAD {r['from'] or '(damaged)'} -> [bold]{r['to']}[/]; concepts: {esc(', '.join(r['concepts']) or 'none')}")
    if r["dropped"]:
        out.print(f"no longer current: {esc(', '.join(r['dropped']))}")
    if r["restored"]:
        out.print(f"back in the model: {esc(', '.join(r['restored']))}")
    if r["later_versions"]:
        out.print(f"kept until `edgecp gc`: {', '.join(r['later_versions'])} (roll forward with `edgecp rollback`)")


def remove_concept_cmd(
    name: Annotated[str, typer.Argument(help="The concept to forget (see `edgecp concepts`).")],
    store: StoreOpt,
    mode: Annotated[Optional[str], typer.Option(help="exact (default where the method allows it), token-only, or rollback.")] = None,
) -> None:
    """Forget one concept: a new version without it (or, with --mode rollback, HEAD back to before it).

    Examples:
      edgecp remove-concept my-ex --store my-model
      edgecp remove-concept my-ex --store my-model --mode token-only
      edgecp remove-concept my-ex --store my-model --mode rollback
    """
    # lazy: edgecp.lifecycle loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.lifecycle import remove_concept

    r = remove_concept(store, name, mode)
    if r["mode"] == "rollback":
        out.print(f"removed [bold]{esc(name)}[/] by rolling back: HEAD {r['from']} -> {r['to']}")
        others = [c for c in r["dropped"] if c != name]
        if others:
            out.print(f"also no longer current: {esc(', '.join(others))} (kept in history until `edgecp gc`)")
        if r["restored"]:
            out.print(f"[yellow]back in the model:[/] {esc(', '.join(r['restored']))} (removed after that version; "
                      "remove again with --mode token-only)")
    else:
        out.print(f"removed [bold]{esc(name)}[/] ({r['mode']}) -> version {r['to']}; concepts: "
                  f"{esc(', '.join(r['concepts']) or 'none')}")
        if r["traces"]:
            out.print("the token is gone, so the concept can no longer be prompted; the shared adapter keeps traces "
                      "of it (recorded in the manifest)")
    if r["still_in"]:
        out.print(f"earlier versions still hold it: {', '.join(r['still_in'])}; "
                  f"`edgecp gc --store {esc(store)} --keep 1` deletes them")


def verify_cmd(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Check every version's files against the sha256s its manifest recorded, HEAD, store.json and the exports.
    Exits 1 on any problem and says what to run.

    Examples:
      edgecp verify --store my-model
    """
    # lazy: edgecp.lifecycle loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.lifecycle import verify

    r = verify(store)
    if as_json:
        out.print_json(json.dumps(r))
    else:
        for n in r["notes"]:
            out.print(f"note: {esc(n)}", highlight=False, soft_wrap=True)
        for p in r["problems"]:
            err.print(f"[red]problem:[/] {esc(p)}", highlight=False, soft_wrap=True)
        if r["ok"]:
            out.print(f"store {esc(r['store'])} is intact: HEAD {r['head']}, {len(r['intact'])} version(s) verified")
        else:
            err.print(f"[red]error:[/] {len(r['problems'])} problem(s) in {esc(r['store'])}: {esc(r['suggestion'])}",
                      highlight=False, soft_wrap=True)
    if not r["ok"]:
        raise typer.Exit(1)


def gc_cmd(
    store: StoreOpt,
    keep: Annotated[Optional[int], typer.Option(help="Keep only HEAD and its N-1 nearest parents (default: all of HEAD's history).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete versions HEAD no longer reaches (and, with --keep, older history), stale and incomplete exports,
    and leftovers of interrupted writes; report the bytes freed. v0000 (the empty store) is always kept.

    Examples:
      edgecp gc --store my-model
      edgecp gc --store my-model --keep 1
    """
    # lazy: edgecp.lifecycle loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.lifecycle import gc

    r = gc(store, keep, dry_run)
    if as_json:
        out.print_json(json.dumps(r))
        return
    verb = "would delete" if dry_run else "deleted"
    names = f" ({', '.join(r['deleted'])})" if r["deleted"] else ""
    out.print(f"{verb} {len(r['deleted'])} version(s){names} and {len(r['exports_deleted'])} "
              f"export(s); {'would free' if dry_run else 'freed'} {_mb(r['bytes_total'])} "
              f"(versions {_mb(r['bytes_freed']['versions'])}, exports {_mb(r['bytes_freed']['exports'])}, "
              f"leftovers {_mb(r['bytes_freed']['leftovers'])}); kept {', '.join(r['kept'])}")
    if r["left_alone"]:
        out.print(f"left alone (not edgecp's, no edgecp.json): {esc(', '.join(r['left_alone']))}; move them out of "
                  "the store", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("history")(history_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("remove-concept")(remove_concept_cmd)
    app.command("verify")(verify_cmd)
    app.command("gc")(gc_cmd)
