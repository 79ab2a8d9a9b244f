"""`<NAME>` in a prompt: the concept's token, followed by its class word unless the prompt already says it.

Torch-free: the ONNX path expands prompts too.
"""

from __future__ import annotations

import re

from edgecp.errors import EdgecpError

PLACEHOLDER = re.compile(r"<([A-Za-z0-9_-]+)>")


def concept_prompt(template: str, token: str, class_word: str | None) -> str:
    """The training prompt of a concept, e.g. 'a photo of a <my-dog> dog'."""
    subject = f"{token} {class_word}" if class_word else token
    return template.format(subject)


def expand(prompt: str, concepts: list[dict]) -> str:
    """Replace each `<name>` by the concept's token (+ class word); unknown names list the known ones."""
    by_name = {c["name"]: c for c in concepts}

    def sub(m: re.Match) -> str:
        name = m.group(1)
        c = by_name.get(name)
        if c is None:
            known = ", ".join(f"<{n}>" for n in by_name) or "none yet (add one with `edgecp add-concept`)"
            raise EdgecpError(f"unknown concept <{name}> in the prompt: known concepts are {known}")
        word = c.get("class_word")
        rest = prompt[m.end():].lstrip()
        if word and not re.match(rf"{re.escape(word)}\b", rest, flags=re.IGNORECASE):
            return f"{c['token']} {word}"
        return c["token"]

    return PLACEHOLDER.sub(sub, prompt)


