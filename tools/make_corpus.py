#!/usr/bin/env python
"""Write a real text corpus as jsonl from what is on this machine, no network needed.

Sources (each used when present; --sources picks):
  stdlib      the running interpreter's standard library: one document per .py file
  python-doc  Debian's python3.11-doc HTML manual, as text, one document per page
  gcide       Debian's dict-gcide dictionary, one document per headword entry
  linux       Debian's linux-source-6.1 tarball: .c, .h, .rst and .txt files, read from the archive
  packages    the running interpreter's installed packages (site-packages): one document per .py
              file, in an order mixed across packages; used only when named (a GPU box holds
              little else, and it would change what the default corpus is)
Each line is {"text": ..., "source": ..., "id": ...}. The run reports documents and bytes per source.

  python tools/make_corpus.py --output data/corpus.jsonl --max-bytes 50000000
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import pathlib
import re
import signal
import sys
import sysconfig
import tarfile

PYTHON_DOC = "/usr/share/doc/python3.11/html"
GCIDE = "/usr/share/dictd/gcide.dict.dz"
LINUX_TARBALLS = "/usr/src/linux-source-6.1*.tar.*"


def stdlib_documents():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            yield str(path.relative_to(root)), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def package_documents():
    roots = sorted({pathlib.Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})
    paths = [(root, path) for root in roots if root.is_dir() for path in root.rglob("*.py")]
    # sorted by a hash of the path: a --max-bytes prefix and the validation split hold many packages,
    # not the alphabet's first few; the order is the same on every run
    for root, path in sorted(paths, key=lambda item: hashlib.sha1(str(item[1].relative_to(item[0])).encode()).digest()):
        try:
            yield str(path.relative_to(root)), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


class _TextOfHtml(html.parser.HTMLParser):
    SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__()
        self.parts, self._skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in ("p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "tr", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def python_doc_documents():
    for path in sorted(glob.glob(f"{PYTHON_DOC}/**/*.html", recursive=True)):
        parser = _TextOfHtml()
        parser.feed(open(path, encoding="utf-8", errors="replace").read())
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()
        if text:
            yield os.path.relpath(path, PYTHON_DOC), text


def gcide_documents():
    # the dictd file is gzip-compatible; entries start at lines naming a headword in <hw>..</hw>
    with gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace") as handle:
        entry, number = [], 0
        for line in handle:
            if entry and line and not line[0].isspace() and line.strip():
                text = "".join(entry).strip()
                if len(text) > 40:
                    number += 1
                    yield f"entry-{number}", text
                entry = []
            entry.append(line)
        if entry:
            yield f"entry-{number + 1}", "".join(entry).strip()


def linux_documents(tarballs=LINUX_TARBALLS):
    for tarball in sorted(glob.glob(tarballs)):
        with tarfile.open(tarball, "r|*") as archive:  # streaming: nothing is extracted
            for member in archive:
                if member.isfile() and member.name.endswith((".c", ".h", ".rst", ".txt")):
                    data = archive.extractfile(member).read()
                    try:
                        yield member.name, data.decode("utf-8")
                    except UnicodeDecodeError:
                        continue


SOURCES = {
    "stdlib": (stdlib_documents, lambda: True),
    "python-doc": (python_doc_documents, lambda: os.path.isdir(PYTHON_DOC)),
    "gcide": (gcide_documents, lambda: os.path.isfile(GCIDE)),
    "linux": (linux_documents, lambda: bool(glob.glob(LINUX_TARBALLS))),
    "packages": (package_documents, lambda: True),
}
OPT_IN = {"packages"}  # never part of the default (every source present)
INSTALL_HINT = {"python-doc": "apt-get install python3.11-doc", "gcide": "apt-get install dict-gcide",
                "linux": "apt-get install linux-source-6.1"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--sources", default=None, help=f"comma-separated, of {', '.join(SOURCES)} "
                        "(default: every one present)")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop after about this many bytes of text")
    parser.add_argument("--linux-tarball", default=LINUX_TARBALLS,
                        help=f"the kernel source tarball(s) for the linux source (default: {LINUX_TARBALLS})")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    SOURCES["linux"] = (lambda: linux_documents(args.linux_tarball), lambda: bool(glob.glob(args.linux_tarball)))
    if args.sources:
        names = [name.strip() for name in args.sources.split(",") if name.strip()]
    else:
        names = [name for name, (_, present) in SOURCES.items() if name not in OPT_IN and present()]
        missing = [f"{name} ({INSTALL_HINT[name]})" for name in SOURCES if name not in names and name not in OPT_IN]
        if missing:
            print(f"note: not installed here, so not used: {', '.join(missing)}", file=sys.stderr)
    for name in names:
        if name not in SOURCES:
            print(f"error: unknown source {name!r}; choose from {', '.join(SOURCES)}", file=sys.stderr)
            return 1
        if not SOURCES[name][1]():
            print(f"error: source {name} is not installed here ({INSTALL_HINT[name]})", file=sys.stderr)
            return 1
    if args.max_bytes is not None and args.max_bytes <= 0:
        print(f"error: --max-bytes must be positive, got {args.max_bytes}", file=sys.stderr)
        return 1
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    partial = f"{args.output}.tmp-{os.getpid()}"
    total, report = 0, {}
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so that `finally` cleans up
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for name in names:
                documents = nbytes = 0
                if args.max_bytes is not None and total >= args.max_bytes:  # budget spent: do not open it
                    report[name] = (0, 0)
                    continue
                for doc_id, text in SOURCES[name][0]():
                    if args.max_bytes is not None and total >= args.max_bytes:
                        break
                    if not text.strip():  # empty files are no documents
                        continue
                    out.write(json.dumps({"text": text, "source": name, "id": doc_id}, ensure_ascii=False) + "\n")
                    size = len(text.encode("utf-8"))
                    documents, nbytes, total = documents + 1, nbytes + size, total + size
                report[name] = (documents, nbytes)
        os.replace(partial, args.output)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    for name, (documents, nbytes) in report.items():
        print(f"{name:10s} {documents:8,} documents {nbytes:14,} bytes")
    print(f"{'total':10s} {sum(d for d, _ in report.values()):8,} documents {total:14,} bytes -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
