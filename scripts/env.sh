# Sourced by scripts/demo and scripts/test: makes on first use what the pack needs to run in ComfyUI and
# exports PY (that Python) and COMFYUI_PATH (the ComfyUI it runs in).
#
# Python: $DISENTANGLE_PYTHON if set (used as it is, nothing installed), else the virtual environment
#   $DISENTANGLE_VENV (default: <pack>/.venv), made on first use with the pinned torch, ComfyUI's own
#   requirements (its web frontend included), requests (ComfyUI 0.3.64's server imports it) and the
#   test and loss-model packages; re-installed when those lists change.
# ComfyUI: $COMFYUI_PATH, else the ComfyUI this pack is installed in (<ComfyUI>/custom_nodes/<pack>), else a
#   checkout made earlier by this script (or ${TMPDIR:-/tmp}/ComfyUI), else, when online, a git checkout of
#   the pinned ComfyUI release into $DISENTANGLE_CACHE. Otherwise it says what to do and stops, unless
#   DISENTANGLE_COMFYUI_OPTIONAL=1 (scripts/test: the tests that need no ComfyUI run, the others skip loudly).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFYUI_VERSION="0.3.64"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
EXTRA_PACKAGES=(requests pytest open_clip_torch ftfy lpips selenium)
CACHE="${DISENTANGLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-disentangle}"

say() { printf '[disentangle] %s\n' "$*" >&2; }

is_comfyui() { [ -f "$1/main.py" ] && [ -f "$1/nodes.py" ] && [ -d "$1/comfy" ]; }

find_comfyui() {
  if [ -n "${COMFYUI_PATH:-}" ]; then
    if is_comfyui "$COMFYUI_PATH"; then (cd "$COMFYUI_PATH" && pwd); return 0; fi
    say "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (no main.py, nodes.py and comfy/ there)."
    return 1
  fi
  local parent; parent="$(dirname "$PACK_DIR")"
  if [ "$(basename "$parent")" = "custom_nodes" ] && is_comfyui "$(dirname "$parent")"; then
    (cd "$(dirname "$parent")" && pwd); return 0
  fi
  local candidate
  for candidate in "$CACHE/ComfyUI-v$COMFYUI_VERSION" "${TMPDIR:-/tmp}/ComfyUI"; do
    if is_comfyui "$candidate"; then echo "$candidate"; return 0; fi
  done
  if command -v git >/dev/null 2>&1; then
    say "no ComfyUI found: cloning ComfyUI v$COMFYUI_VERSION into $CACHE/ComfyUI-v$COMFYUI_VERSION ..."
    mkdir -p "$CACHE"
    if GIT_TERMINAL_PROMPT=0 timeout 900 git clone -q --depth 1 --branch "v$COMFYUI_VERSION" \
        https://github.com/comfyanonymous/ComfyUI "$CACHE/ComfyUI-v$COMFYUI_VERSION.partial" 2>/dev/null; then
      mv "$CACHE/ComfyUI-v$COMFYUI_VERSION.partial" "$CACHE/ComfyUI-v$COMFYUI_VERSION"
      echo "$CACHE/ComfyUI-v$COMFYUI_VERSION"; return 0
    fi
    rm -rf "$CACHE/ComfyUI-v$COMFYUI_VERSION.partial"
  fi
  cat >&2 <<MSG
[disentangle] No ComfyUI found, and none could be cloned (offline, or no git). Do one of:
  - export COMFYUI_PATH=/path/to/ComfyUI   (a ComfyUI $COMFYUI_VERSION folder: main.py, nodes.py, comfy/), or
  - install this pack as ComfyUI/custom_nodes/$(basename "$PACK_DIR") and run this command from there, or
  - git clone --branch v$COMFYUI_VERSION https://github.com/comfyanonymous/ComfyUI "$CACHE/ComfyUI-v$COMFYUI_VERSION"
then run the command again.
MSG
  return 1
}

make_python() {
  if [ -n "${DISENTANGLE_PYTHON:-}" ]; then echo "$DISENTANGLE_PYTHON"; return 0; fi
  local venv="${DISENTANGLE_VENV:-$PACK_DIR/.venv}"
  local py="$venv/bin/python"
  local requirements="$venv/comfyui-requirements.txt"
  mkdir -p "$venv"
  if [ -n "${COMFYUI_PATH:-}" ]; then
    grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFYUI_PATH/requirements.txt" > "$requirements.new"
  else
    printf '%s\n' numpy safetensors Pillow > "$requirements.new"
  fi
  local want; want="$( { printf '%s\n' "${TORCH_PINS[@]}" "${EXTRA_PACKAGES[@]}"; cat "$requirements.new"; } | sha1sum | cut -c1-16)"
  if [ -x "$py" ] && [ "$(cat "$venv/.disentangle-installed" 2>/dev/null)" = "$want" ]; then
    rm -f "$requirements.new"; echo "$py"; return 0
  fi
  say "setting up $venv (first use: torch ${TORCH_PINS[0]#torch==}, ComfyUI $COMFYUI_VERSION's requirements; a few minutes) ..."
  [ -x "$py" ] || python3 -m venv "$venv" >&2
  local pip=("$py" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" "${TORCH_PINS[@]}" >&2
  mv "$requirements.new" "$requirements"
  "${pip[@]}" -r "$requirements" "${EXTRA_PACKAGES[@]}" >&2
  echo "$want" > "$venv/.disentangle-installed"
  echo "$py"
}

if COMFYUI_PATH="$(find_comfyui)"; then
  export COMFYUI_PATH
elif [ "${DISENTANGLE_COMFYUI_OPTIONAL:-0}" = 1 ]; then
  say "going on WITHOUT ComfyUI: the tests that need it will be SKIPPED"
  unset COMFYUI_PATH
else
  exit 3
fi
PY="$(make_python)"
export PY
if [ -n "${COMFYUI_PATH:-}" ]; then
  say "ComfyUI $(grep -oE '[0-9]+\.[0-9]+\.[0-9]+' "$COMFYUI_PATH/comfyui_version.py" 2>/dev/null | head -1) at $COMFYUI_PATH; Python $PY"
fi
