#!/usr/bin/env bash
# Fetch the paper's example set and checkpoints into playground/ (an explicit, optional step):
#   playground/SAM/sam_vit_b_01ec64.pth, playground/MedSegX/medsegx_vit_b.pth, playground/MedSegDB-example/
# Offline it fails fast, saying what to copy where.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
mkdir -p playground/SAM playground/MedSegX

fetch() {  # url dest: download to a .part file, keep it only if complete and not an HTML error page
    local url=$1 dest=$2
    [ -f "$dest" ] && { echo "[download] $dest already present"; return 0; }
    echo "[download] $url -> $dest"
    if ! curl -fsSL --connect-timeout 10 --retry 2 -o "$dest.part" "$url"; then
        rm -f "$dest.part"
        echo "[download] cannot fetch $url (offline, or the address moved)." >&2
        echo "           Download it elsewhere and copy it to $dest." >&2
        return 1
    fi
    if head -c 512 "$dest.part" | grep -qi "<html"; then
        rm -f "$dest.part"
        echo "[download] $url returned a web page, not the file; download it in a browser into $dest." >&2
        return 1
    fi
    mv "$dest.part" "$dest"
}

status=0
fetch https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth playground/SAM/sam_vit_b_01ec64.pth || status=1
fetch "https://drive.google.com/uc?export=download&id=1_lTLYQ1p0Et8GGgUNJWzONVSc6RwbRGe" \
    playground/MedSegX/medsegx_vit_b.pth || status=1
if [ ! -d playground/MedSegDB-example ]; then
    if fetch https://github.com/MedSegX/MedSegX-code/raw/main/playground/example_data.zip playground/example_data.zip; then
        (cd playground && unzip -q -o example_data.zip) || status=1
    else
        status=1
    fi
fi
exit $status
