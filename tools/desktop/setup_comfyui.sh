#!/bin/bash
# The reference environment for tools/check_comfyui.py: ComfyUI's own code, unmodified, in its own venv.
#   GIT_DIR=<ComfyUI git dir> DEST=/tmp/comfy bash tools/desktop/setup_comfyui.sh
# GIT_DIR: a clone of https://github.com/Comfy-Org/ComfyUI (what was run: a125cd84b054a57729b5eecab930ca9408719832,
# ComfyUI 0.3.64). Here it came from the tool library's mirror (github:comfyanonymous/ComfyUI's snapshot is over its
# size limit; Comfy-Org/ComfyUI is the same project under its newer owner).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${DEST:-/tmp/comfy}
REPO=$(cd "$HERE/../.." && pwd)
mkdir -p "$DEST"
[ -d "$DEST/ComfyUI/comfy" ] || bash "$HERE/extract_git_tree.sh" "$GIT_DIR" "$DEST/ComfyUI"
[ -x "$DEST/venv/bin/python" ] || python3.11 -m venv "$DEST/venv"
"$DEST/venv/bin/python" -m pip install -q --upgrade pip
# torch pinned as edgecp pins it (constraints.txt); this ComfyUI predates transformers 5
"$DEST/venv/bin/python" -m pip install -q -c "$REPO/constraints.txt" torch einops "transformers>=4.37.2,<5" tokenizers \
    sentencepiece "safetensors>=0.4.2" "numpy>=1.25.0" scipy tqdm psutil pyyaml Pillow torchsde
# Not installed: torchvision (PyPI's wheels are CUDA builds that fail beside a CPU torch: 'operator torchvision::nms
# does not exist'; comfyui_reader.py stands an inert module in for it, which only Stable Cascade / Cosmos / ACE
# import), torchaudio (ComfyUI only warns), the frontend, workflow-template and docs packages, aiohttp, yarl,
# alembic, SQLAlchemy, av, kornia, spandrel, pydantic-settings (the server and extras, not the model code).
echo "ComfyUI at $DEST/ComfyUI ($(cat "$DEST/ComfyUI/COMFY_COMMIT")), python $DEST/venv/bin/python"
