"""Coverage-guided fuzzing of Braid's parsers with atheris (libFuzzer for Python).

    python tests/fuzz/run.py [--seconds N] [--target NAME ...] [--corpus DIR] [--findings DIR]
    python tests/fuzz/run.py --target NAME FILE ...     # run saved inputs once (reproduce)

Each target (tests/fuzz/targets.py) runs alone in a child process, with the
braid modules instrumented, for N seconds. Its corpus directory is seeded with
valid inputs built by the real encoders and keeps what the fuzzer found
interesting, so later runs start further. Crashing, hanging (over 5 s) or
memory-hungry (over 512 MB) inputs are saved in the findings directory.

The exit status is 1 when any target had a finding, 2 when one could not run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_CORPUS = ROOT / "test-output" / "fuzz-corpus"
DEFAULT_FINDINGS = ROOT / "test-output" / "fuzz-findings"
TIMEOUT = 5  # seconds one input may take
RSS_LIMIT_MB = 512
GRACE = 60  # seconds a child may overrun its -max_total_time before it counts as hung


@dataclass
class Finding:
    kind: str  # "crash", "timeout", "oom", ... from libFuzzer's artifact name
    artifact: Path | None
    summary: str  # the exception's last line, or libFuzzer's error


@dataclass
class Result:
    name: str
    seconds: float = 0.0
    execs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    findings: list[Finding] = field(default_factory=list)
    error: str = ""  # the child did not fuzz at all (import error, bad option)
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings and not self.error


def dict_entry(token: bytes) -> str:
    escaped = "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token
    )
    return f'"{escaped}"'


def prepare(name: str, corpus_root: Path) -> tuple[Path, Path]:
    """The target's corpus directory, seeded, and its libFuzzer dictionary file."""
    from targets import TARGETS, seed_name  # not at the top: the child instruments it

    target = TARGETS[name]
    corpus = corpus_root / name
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in target.seeds():
        path = corpus / seed_name(seed)
        if not path.exists():
            path.write_bytes(seed)
    dictionary = corpus_root / f"{name}.dict"
    dictionary.write_text("".join(dict_entry(t) + "\n" for t in target.dictionary))
    return corpus, dictionary


def libfuzzer_args(name: str, seconds: float, corpus: Path, dictionary: Path, findings: Path):
    from targets import TARGETS

    findings.mkdir(parents=True, exist_ok=True)
    args = [
        f"-max_total_time={max(1, round(seconds))}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-timeout={TIMEOUT}",
        f"-max_len={TARGETS[name].max_len}",
        f"-artifact_prefix={findings}{os.sep}",
        "-print_final_stats=1",
    ]
    if dictionary.stat().st_size:
        args.append(f"-dict={dictionary}")
    return [*args, str(corpus)]


def parse_log(result: Result, log: str) -> None:
    result.log = log
    # The final statistics, else the last status line ("#1234 pulse cov: ..." or "Done").
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    runs = runs or re.findall(r"^#(\d+)\s", log, re.M)
    if runs:
        result.execs = int(runs[-1])
    for key in ("cov", "ft"):
        if values := re.findall(rf"\b{key}: (\d+)", log):
            setattr(result, key, int(values[-1]))
    if corp := re.findall(r"\bcorp: (\d+)/", log):
        result.corpus = int(corp[-1])
    for m in re.finditer(r"Test unit written to (\S+)", log):
        artifact = Path(m.group(1))
        kind = artifact.name.split("-", 1)[0]
        result.findings.append(Finding(kind, artifact, summarise(log)))


def summarise(log: str) -> str:
    """The uncaught exception's last line (type: message), else libFuzzer's error line."""
    m = re.search(r"=== Uncaught Python exception: ===\n(.*?)\n(?:==|\S*INFO:|MS:)", log, re.S)
    if m:
        lines = [line for line in m.group(1).splitlines() if line.strip()]
        if lines:
            frames = [line.strip() for line in lines if line.strip().startswith('File "')]
            # The innermost frame in Braid's own code says best where to look.
            ours = [f for f in frames if "/braid/" in f and "/tests/fuzz/" not in f]
            where = (ours or frames)[-1:]
            return lines[-1].strip() + (f"  (at {where[0]})" if where else "")
    m = re.search(r"ERROR: libFuzzer: (.*)", log)
    return m.group(1).strip() if m else "unknown"


def fuzz(
    name: str,
    seconds: float,
    corpus_root: Path = DEFAULT_CORPUS,
    findings_root: Path = DEFAULT_FINDINGS,
    inputs: list[Path] | None = None,
) -> Result:
    """Fuzz one target for ``seconds`` in a child process (or run ``inputs`` once)."""
    result = Result(name)
    corpus, dictionary = prepare(name, corpus_root)
    args = libfuzzer_args(name, seconds, corpus, dictionary, findings_root / name)
    if inputs:
        args = [a for a in args if not a.startswith("-max_total_time")][:-1]
        args += [str(p) for p in inputs]
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--", *args]
    start = time.monotonic()
    scratch = tempfile.TemporaryDirectory(prefix="braid-fuzz-")  # for the file loaders
    try:
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=seconds + GRACE,
            cwd=ROOT,
            env={**os.environ, "BRAID_FUZZ_SCRATCH": scratch.name},
        )
        log = proc.stdout.decode(errors="replace")
        returncode = proc.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace")
        result.findings.append(Finding("hang", None, f"still running {seconds + GRACE:g} s later"))
        returncode = None
    finally:
        scratch.cleanup()
    result.seconds = time.monotonic() - start
    parse_log(result, log)
    if returncode and not result.findings:
        if "ERROR: libFuzzer" in log or "Uncaught Python exception" in log:
            result.findings.append(Finding("crash", None, summarise(log)))
        else:
            tail = "\n".join(log.splitlines()[-15:])
            result.error = f"the fuzzer exited with status {returncode}:\n{tail}"
    return result


def child(name: str, args: list[str]) -> None:
    """Runs in the child process: instrument braid, then hand over to libFuzzer for good."""
    import logging

    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["braid"]):
        import targets
    logging.disable(logging.CRITICAL)  # the loaders log every unreadable file
    atheris.Setup([sys.argv[0], *args], targets.TARGETS[name].run)
    atheris.Fuzz()


def report(results: list[Result]) -> str:
    rows = [
        f"{'target':<18} {'seconds':>7} {'execs':>10} {'exec/s':>8} {'cov':>6} {'ft':>6} "
        f"{'corpus':>6}  findings"
    ]
    for r in results:
        rate = r.execs / r.seconds if r.seconds else 0
        status = "error" if r.error else str(len(r.findings))
        rows.append(
            f"{r.name:<18} {r.seconds:>7.0f} {r.execs:>10} {rate:>8.0f} {r.cov:>6} {r.ft:>6} "
            f"{r.corpus:>6}  {status}"
        )
    for r in results:
        for f in r.findings:
            rows.append(f"  {r.name}: {f.kind}: {f.summary}")
            if f.artifact:
                rows.append(
                    f"    input saved as {f.artifact}; "
                    f"reproduce: python tests/fuzz/run.py --target {r.name} {f.artifact}"
                )
        if r.error:
            rows.append(f"  {r.name}: {r.error}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:])  # ["--child", NAME, "--", libFuzzer arguments...]
        return 0
    sys.path.insert(0, str(HERE))
    from targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="per target (default 60)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), metavar="NAME")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--findings", type=Path, default=DEFAULT_FINDINGS)
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("inputs", nargs="*", type=Path, help="run these inputs once instead")
    options = parser.parse_args(argv)
    if options.list:
        print("\n".join(TARGETS))
        return 0
    names = options.target or list(TARGETS)
    if options.inputs and len(names) != 1:
        parser.error("give one --target to run inputs")
    results = []
    for name in names:  # one at a time: each child keeps a core busy
        print(f"fuzzing {name} for {options.seconds:g} s", file=sys.stderr, flush=True)
        results.append(
            fuzz(name, options.seconds, options.corpus, options.findings, options.inputs)
        )
        if not results[-1].ok:
            print(results[-1].log[-4000:], file=sys.stderr)
    print(report(results))
    if any(r.error for r in results):
        return 2
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
