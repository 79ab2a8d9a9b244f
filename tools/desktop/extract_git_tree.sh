#!/bin/bash
# Extract a git HEAD tree (ComfyUI) from a git dir, skipping blobs the snapshot lacks (files >= 4 MiB).
# usage: extract_comfy.sh GIT_DIR DEST
set -e
GIT_DIR=$1; DEST=$2
mkdir -p "$DEST"
git --git-dir="$GIT_DIR" rev-parse HEAD > "$DEST/COMFY_COMMIT"
git --git-dir="$GIT_DIR" ls-tree -r -z HEAD | GIT_DIR="$GIT_DIR" DEST="$DEST" python3 -c '
import sys, subprocess, os
dest = os.environ["DEST"].encode(); missing = []; n = 0
for ent in sys.stdin.buffer.read().split(b"\0"):
    if not ent: continue
    meta, path = ent.split(b"\t", 1); mode, typ, sha = meta.split()
    if typ != b"blob": continue
    p = os.path.join(dest, path); os.makedirs(os.path.dirname(p), exist_ok=True)
    r = subprocess.run(["git", "cat-file", "blob", sha], capture_output=True)
    if r.returncode: missing.append(path.decode()); continue
    if mode == b"120000": os.symlink(r.stdout, p)
    else:
        open(p, "wb").write(r.stdout)
        if mode == b"100755": os.chmod(p, 0o755)
    n += 1
print(n, "files written; missing from snapshot:", missing)'
