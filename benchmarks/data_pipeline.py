"""Data-stage throughput and memory: collect, clean and tokenize on the default corpus
and on a synthetic corpus ten times larger.

The default corpus is the standard library's docstrings (the collect stage's default
source). The 10x corpus is that corpus plus nine copies in which every word of four or
more letters is swapped through a different random permutation of the vocabulary: the
copies keep the statistics of real text (stop words, lengths, layout) but share no long
spans, so deduplication and decontamination do not simply remove them. Both corpora are
written as JSONL and collected with a files source, so the two sizes run the same code.

Each size runs in its own process, so its peak resident memory is its own; memory
should stay flat as the corpus grows (ratio 10x/1x within 1.25). Throughput is text
bytes entering each stage per wall-clock second; CPU seconds are printed beside it
because other load on a shared machine stretches wall time but not CPU time. The
MinHash signature peer is datasketch on the same shingles, when it is installed.

    python -m benchmarks.data_pipeline [--scale 10] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.arguments import count

REPO = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.data_pipeline"
CONTENT_WORD = re.compile(r"\b[A-Za-z]{4,}\b")
MB = 1e6


def cpu_seconds() -> float:
    """CPU time of this process and its descendants: finished children, and live children
    with the children they reaped (the clean stage's fork server and its workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # fields after the name: state, ppid, ..., utime at index 11
            total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss() -> int:
    """Peak resident memory so far, in bytes, of this process or its largest finished child."""
    return 1024 * max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def timed(run: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def synthetic(docs: list[dict[str, str]], copies: int) -> list[dict[str, str]]:
    """`docs` and `copies - 1` copies with their longer words permuted (see the module docstring)."""
    vocabulary = sorted({word for doc in docs for word in CONTENT_WORD.findall(doc["text"])})
    out = [{"id": doc["id"], "text": doc["text"]} for doc in docs]
    for copy in range(1, copies):
        shuffled = vocabulary[:]
        random.Random(copy).shuffle(shuffled)
        swap = dict(zip(vocabulary, shuffled))
        out += [
            {"id": f"{doc['id']}~{copy}", "text": CONTENT_WORD.sub(lambda m: swap[m.group()], doc["text"])}
            for doc in docs
        ]
    return out


def worker(corpus: Path, root: Path) -> dict[str, Any]:
    """Collect the JSONL corpus, clean and tokenize it with default configs; time each stage."""
    from tasks.clean import CleanConfig, clean
    from tasks.collect import CollectConfig, FilesSource, collect
    from tasks.tokenize import TokenizeConfig, tokenize

    stages = {}
    collected, wall, cpu = timed(lambda: collect(CollectConfig(sources=[FilesSource(paths=[str(corpus)])]), root))
    stages["collect"] = {"bytes": corpus.stat().st_size, "seconds": wall, "cpu": cpu, "rss": peak_rss()}
    cleaned, wall, cpu = timed(lambda: clean(collected, CleanConfig(), root))
    stages["clean"] = {"bytes": cleaned.counts["bytes_in"], "seconds": wall, "cpu": cpu, "rss": peak_rss()}
    tokens, wall, cpu = timed(lambda: tokenize(cleaned, TokenizeConfig(), root))
    stages["tokenize"] = {"bytes": cleaned.counts["bytes_out"], "seconds": wall, "cpu": cpu, "rss": peak_rss()}
    return {
        "stages": stages,
        "raw_bytes": cleaned.counts["bytes_in"],
        "docs": [cleaned.counts["docs_in"], cleaned.counts["docs_out"]],
        "tokens": tokens.counts["train_tokens"] + tokens.counts["validation_tokens"],
        "clean_workers": cleaned.manifest()["workers"],
        "peak_rss": peak_rss(),
    }


def run_size(corpus: Path, root: Path) -> tuple[dict[str, Any], int]:
    """One size in a fresh process; returns its report and the peak RSS (bytes) of its processes,
    as that process measured it (this one's counter of reaped children would keep the peak of
    every size run before)."""
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, "--worker", str(corpus), "--workspace", str(root)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed:\n{proc.stderr[-4000:]}")
    measured = json.loads(proc.stdout.splitlines()[-1])
    return measured, measured["peak_rss"]


def minhash_peer(docs: list[dict[str, str]]) -> str:
    """MinHash signatures of 5-word shingles: rensa (used here) against datasketch."""
    try:
        import datasketch
    except ImportError:
        return "MinHash peer: datasketch is not installed"
    from tasks.clean import CleanConfig
    from tasks.dedup import Words, minhash

    config = CleanConfig()
    words = [Words(doc["text"]) for doc in docs]
    for w in words:
        w.grams(config.shingle_words)  # shingle hashes computed once, outside both timings
    size = sum(len(doc["text"].encode()) for doc in docs) / MB
    _, ours, _ = timed(lambda: [minhash(w, config.shingle_words, config.num_perm, config.minhash_seed) for w in words])

    def theirs() -> None:
        for w in words:
            signature = datasketch.MinHash(num_perm=config.num_perm, seed=config.minhash_seed)
            signature.update_batch(w.grams(config.shingle_words).view("S8").tolist())

    _, peer, _ = timed(theirs)
    return (
        f"MinHash signatures (rensa {version('rensa')}, datasketch {version('datasketch')}): "
        f"{size / peer:.1f} MB/s datasketch | {size / ours:.1f} MB/s ours | {peer / ours:.1f}x"
    )


def report(results: dict[str, dict[str, Any]], rss: dict[str, int]) -> str:
    sizes = list(results)
    header = f"{'stage':<10}" + "".join(
        f"  {size + ' MB':>8} {'s':>6} {'cpu s':>6} {'MB/s':>6} {'RSS':>5}" for size in sizes
    )
    lines = [header]
    for stage in ("collect", "clean", "tokenize"):
        row = f"{stage:<10}"
        for size in sizes:
            s = results[size]["stages"][stage]
            throughput, rss_mib = s["bytes"] / MB / s["seconds"], s["rss"] >> 20
            row += f"  {s['bytes'] / MB:>8.2f} {s['seconds']:>6.2f} {s['cpu']:>6.2f} {throughput:>6.2f} {rss_mib:>5}"
        lines.append(row)
    row = f"{'all':<10}"
    for size in sizes:
        stages = results[size]["stages"].values()
        seconds, cpu = sum(s["seconds"] for s in stages), sum(s["cpu"] for s in stages)
        raw = results[size]["raw_bytes"]
        row += f"  {raw / MB:>8.2f} {seconds:>6.2f} {cpu:>6.2f} {raw / MB / seconds:>6.2f} {'':>5}"
    lines.append(row)
    lines.append(
        "(MB: text entering the stage; cpu s: CPU time of the stage's processes; "
        "all: raw text over the three stages' seconds; RSS: peak MiB so far)"
    )
    for size in sizes:
        r = results[size]
        lines.append(
            f"{size}: {r['docs'][0]} docs in, {r['docs'][1]} kept, {r['tokens']:,} tokens, "
            f"clean workers {r['clean_workers']}, peak RSS {rss[size] / 2**20:.0f} MiB"
        )
    first, last = sizes[0], sizes[-1]
    lines.append(f"peak RSS {last}/{first}: {rss[last] / rss[first]:.2f} (should stay within 1.25)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scale", type=count(2), default=10,
                        help="size of the large corpus, in copies of the default one")
    parser.add_argument("--workspace", type=Path,
                        help="an empty or new directory for the stage outputs (default: a temporary one)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workspace)))
        return
    if args.workspace and args.workspace.exists() and not args.workspace.is_dir():
        parser.error(f"--workspace {args.workspace} is a file: name a new or empty directory")
    if args.workspace and args.workspace.exists() and any(args.workspace.iterdir()):
        parser.error(f"--workspace {args.workspace} is not empty: its stage outputs would be reused, not timed")

    from tasks.collect import collect, iter_documents
    from tasks.stage import cpu_cores

    base = Path(args.workspace or tempfile.mkdtemp(prefix="tinyseek-bench-"))
    try:
        stdlib, wall, cpu = timed(lambda: collect(root=base / "stdlib"))
        docs = list(iter_documents(stdlib))
        size = sum(len(doc["text"].encode()) for doc in docs) / MB
        print(f"collect, default stdlib source: {size:.2f} MB of docstrings in {wall:.2f} s ({cpu:.2f} cpu s)")
        print(minhash_peer(docs))
        results, rss = {}, {}
        for scale in (1, args.scale):
            corpus = base / f"corpus-{scale}x.jsonl"
            with open(corpus, "w") as out:
                for doc in synthetic(docs, scale):
                    out.write(json.dumps(doc) + "\n")
            results[f"{scale}x"], rss[f"{scale}x"] = run_size(corpus, base / f"ws-{scale}x")
        print(report(results, rss))
        load = os.getloadavg()[0]
        print(f"{cpu_cores()} cores; load average {load:.1f} (other work on the machine stretches wall time)")
    finally:
        if not args.workspace:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
