"""The lifecycle commands of `edgecp`: history, rollback, remove-concept, verify, gc (library: edgecp/lifecycle.py).

Registered on the main app by `register(app)`; each parses, calls ONE library function and renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgecp.cli.common import JsonOpt, StoreOpt, console, table
from edgecp.errors import EdgecpError
from edgecp.render import esc

out = console(soft_wrap=True)  # long paths stay on one line (and on no line break where output is not a terminal)
err = console(stderr=True, soft_wrap=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,} B"


def history_cmd(
    store: StoreOpt,
    concept: Annotated[Optional[str], typer.Argument(
        help="A concept: its training record (loss per iteration of each phase) instead of the versions.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="With a concept: draw its loss curves to this .png.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The store's versions: what each did, when, with which method, how many bytes, what the forgetting check
    found; HEAD marked; a pending resumable concept. With a concept: its training record.

    Examples:
      edgecp history --store my-model
      edgecp history --store my-model --json
      edgecp history my-dog --store my-model --plot dog.png
    """
    # lazy: edgecp.lifecycle loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.lifecycle import history, plot_record, training_record

    if concept is not None:
        rec = training_record(store, concept)
        if as_json:
            out.print_json(json.dumps(rec))
        else:
            fx = rec.get("metrics", {})
            out.print(f"<{esc(concept)}> was added in {rec['version']}; fixed-timestep loss "
                      f"{fx.get('loss_fixed_before', float('nan')):.4f} -> {fx.get('loss_fixed_after', float('nan')):.4f}",
                      highlight=False)
            for phase, p in rec["phases"].items():
                v = p["values"]
                out.print(f"  {phase}: {len(v)} iterations of {esc(p['metric'])}: first {v[0]:.4f}, last {v[-1]:.4f}, "
                          f"mean of the last tenth {sum(v[-max(len(v) // 10, 1):]) / max(len(v) // 10, 1):.4f}",
                          highlight=False)
        if plot is not None:
            out.print(f"wrote {esc(plot_record(store, concept, plot))}", highlight=False)
        return
    if plot is not None:
        raise EdgecpError("--plot draws one concept's training: name it, e.g. `edgecp history my-dog --plot dog.png`")
    h = history(store)
    if as_json:
        out.print_json(json.dumps(h))
        return
    t = table(f"{esc(h['store'])} - HEAD {h['head'] or '(damaged)'} - {_mb(h['bytes'])} in versions", on=out)
    # a timestamp is never cut ("2026-12-06T19:..."): shown "date time", on one line where there is room; on a
    # terminal under 110 columns its column is the time's width, so it breaks between date and time only (a fixed
    # width: rich's shrinking ignores a column's min_width). The other columns fold there (an unbreakable word
    # would otherwise shrink its column to nothing). HEAD is marked in the version's cell: the table fits 80 columns
    stamp = 13 if out.is_terminal and out.width < 110 else None
    for col in ("version", "parent", "committed", "what", "method", "concepts", "bytes", "forgetting check"):
        t.add_column(col, overflow="fold", width=stamp if col == "committed" else None)
    for r in h["versions"]:
        version = f"{r['version']} [bold](HEAD)[/]" if r["head"] else r["version"]
        if r.get("damaged"):
            t.add_row(version, "?", "?", "[red]damaged: run edgecp verify[/]", "", "", _mb(r["bytes"]), "")
            continue
        t.add_row(version, r["parent"] or "-", (r["committed"] or "-").replace("T", " ", 1),
                  esc(r["what"]), r["method"], esc(", ".join(r["concepts"]) or "-"), _mb(r["bytes"]),
                  _check_cell(r.get("check")))
    out.print(t)
    if h.get("pending"):
        p = h["pending"]
        err.print(f"[yellow]pending:[/] {esc(p.get('line') or p.get('damaged'))}", highlight=False)
    for e in h["events"]:
        if e.get("action") == "gc":
            out.print(f"{e.get('time', '')}  gc deleted {', '.join(e.get('deleted', [])) or 'no version'}")
        else:
            what = f"remove-concept {esc(e.get('concept'))} --mode rollback: " if e.get("action") == "remove-concept" else ""
            out.print(f"{e.get('time', '')}  {what}HEAD {e.get('from')} -> {e.get('to')}")


def _check_cell(chk: dict | None) -> str:
    """The forgetting check of a version in a few words: the largest drift, and who drifted past the threshold."""
    if not chk:
        return "-"
    if chk.get("off"):
        return "off"
    rows = chk.get("concepts") or []
    if not rows:
        return "-"
    worst = max(rows, key=lambda r: r["drift"])
    cell = f"max drift {worst['drift']:.3f} <{esc(worst['name'])}>"
    if chk.get("warn"):
        cell += f" [yellow]warned: {esc(', '.join(chk['warn']))}[/]"
    return cell


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
