"""Real corpora for the forgetting benchmark from Debian packages nobody here wrote: the dictd
dictionaries GCIDE (general English) and FOLDOC (computing), and the fortune-mod quotations.

    apt-get install -y dict-gcide dict-foldoc fortunes
    python bench/corpora.py --out /tmp/corpora       # -> gcide.txt, foldoc.txt, fortunes.txt

fortunes.txt is general English prose and verse by many authors (quotations, jokes, poems): the
`fortunes` package's files minus those about computing (`computers`, `linux`, `debian`, `perl` ...),
which would overlap a computing domain corpus. A fortune file is entries separated by lines holding
only `%`; each entry becomes one document, its lines kept (attributions included).

One document per dictionary entry, written as plain text with documents separated by blank lines
(the data pipeline's .txt format). A dictd database is a gzip-compatible `NAME.dict.dz` plus a
`NAME.index` of `headword <TAB> offset <TAB> length` lines, offset and length in dictd's base64
digits; several headwords can point at the same entry, so entries are deduplicated by
(offset, length), and the `00-*` header entries (`00-database-info` ...) are skipped.

Markup is stripped so the model sees prose: GCIDE's pronunciations (`\\A"["e]r*ate\\`), accent codes
(`["e]` -> e), source tags (`[1913 Webster]`), FOLDOC's revision dates (`(1996-05-28)`), and both
dictionaries' cross-reference braces (`{Air}` -> Air). Whitespace is collapsed to single spaces.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path
from typing import Iterator, List, Optional

DICTD = Path("/usr/share/dictd")
FORTUNES = Path("/usr/share/games/fortunes")
INSTALL_HINT = "apt-get install -y dict-gcide dict-foldoc fortunes"
# The `fortunes` package's general files (not computing, not ASCII art, not the cookie grab-bags).
GENERAL_FORTUNES = (
    "education",
    "food",
    "humorists",
    "kids",
    "law",
    "literature",
    "love",
    "medicine",
    "men-women",
    "people",
    "pets",
    "platitudes",
    "politics",
    "science",
    "songs-poems",
    "sports",
    "wisdom",
    "work",
)
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

_PRONUNCIATION = re.compile(r"\\[^\\\n]{0,80}\\")
_ACCENT = re.compile(r"\[[\"'`^=~.,:;<>|/-]{1,2}([A-Za-z]{1,2})\]")  # ["e] ['e] [=a] -> the letter
_LETTER_CODE = re.compile(
    r"\[([A-Za-z]{1,2})(?:\^|mac|um|dd|sl|cr|dot|sdot)\]"
)  # [i^] [imac] [aum] [asl] -> the letter
_NAMED = {
    "[ae]": "ae",
    "[AE]": "AE",
    "[oe]": "oe",
    "[OE]": "OE",
    "[eth]": "th",
    "[thorn]": "th",
    "[th]": "th",
    "[ng]": "ng",
    "[deg]": " degrees",
    "[root]": "",
    "[sect]": "section",
    "[yogh]": "y",
}
_SOURCE_TAG = re.compile(r"\[(?:1913 Webster|WordNet[^\]]*|PJC|RH|Century Dict\.|Webster 1913 Suppl\.|[A-Z]{2,4})\]")
_DATE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)")
_BRACES = re.compile(r"[{}]")
_SPACE = re.compile(r"\s+")


def dictd_number(digits: str) -> int:
    """dictd's base64 offsets/lengths: most significant digit first, 'A' = 0 ... '/' = 63.
    Example: 'BCy' = 1·64² + 2·64 + 50 = 4274."""
    value = 0
    for c in digits:
        value = value * 64 + _B64.index(c)
    return value


def entries(name: str, root: Path = DICTD) -> Iterator[str]:
    """The raw text of every distinct entry of dictd database `name`, in index order."""
    dz, index = root / f"{name}.dict.dz", root / f"{name}.index"
    if not (dz.is_file() and index.is_file()):
        raise FileNotFoundError(f"{dz} / {index} not found: install the dictionary first ({INSTALL_HINT})")
    data = gzip.open(dz).read()  # 40 MB at most (gcide); dict.dz is gzip with a random-access header
    seen = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        key = (dictd_number(offset), dictd_number(length))
        if headword.startswith(("00-", "00database")) or key in seen:
            continue
        seen.add(key)
        yield data[key[0] : key[0] + key[1]].decode("utf-8", errors="replace")


def clean(entry: str) -> str:
    """One entry as one line of prose (see the module docstring for what is stripped)."""
    text = _PRONUNCIATION.sub("", entry)
    text = _ACCENT.sub(r"\1", text)
    text = _LETTER_CODE.sub(r"\1", text)
    for code, plain in _NAMED.items():
        text = text.replace(code, plain)
    text = _SOURCE_TAG.sub("", text)
    text = _DATE.sub("", text)
    text = _BRACES.sub("", text)
    return _SPACE.sub(" ", text).strip()


def write_corpus(name: str, out: Path, min_chars: int = 40, root: Path = DICTD) -> int:
    """Write dictionary `name` to `out` (documents separated by blank lines); returns the document count.
    Entries shorter than min_chars after cleaning (bare cross-references) are dropped."""
    docs: List[str] = [d for d in (clean(e) for e in entries(name, root)) if len(d) >= min_chars]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return len(docs)


def fortunes(root: Path = FORTUNES, files=GENERAL_FORTUNES, min_chars: int = 40) -> List[str]:
    """The entries of the general fortune files, in file order, each with its lines (tabs and runs of
    spaces collapsed); entries shorter than min_chars are dropped."""
    docs: List[str] = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install the fortunes first ({INSTALL_HINT})")
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [re.sub(r"[ \t]+", " ", line).strip() for line in entry.strip("%\n").splitlines()]
            text = "\n".join(line for line in lines if line)
            if len(text) >= min_chars:
                docs.append(text)
    return docs


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for fortunes.txt, gcide.txt and foldoc.txt")
    p.add_argument("--dictd", default=str(DICTD), help="where the dictd databases live")
    p.add_argument("--fortunes", default=str(FORTUNES), help="where the fortune files live")
    args = p.parse_args(argv)
    docs = fortunes(Path(args.fortunes))
    path = Path(args.out) / "fortunes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"{path}: {len(docs):,} documents, {path.stat().st_size / 2**20:.1f} MiB")
    for name in ("gcide", "foldoc"):
        path = Path(args.out) / f"{name}.txt"
        n = write_corpus(name, path, root=Path(args.dictd))
        print(f"{path}: {n:,} documents, {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
