"""Run every benchmark with its default (short) settings, one after the other, and keep the output.

    python bench/run_all.py                  # all of them (about 15-20 minutes on 2 shared cores)
    python bench/run_all.py overhead scale   # some of them
    python bench/run_all.py --quick          # smaller settings: a smoke run of every script

Each benchmark runs in its own process (so one's memory and threads do not touch the next);
the combined output goes to stdout and to bench/results/latest.txt (not committed automatically).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["differences", "overhead", "scale", "embedding", "generation", "fast_decode", "onnx_step", "user_length",
         "startup"]
QUICK = {
    "differences": ["--cases", "10", "--repeats", "3"],
    "overhead": ["--requests", "100", "--generations", "1", "--no-app-request"],
    "scale": ["--sizes", "9018,100000", "--requests", "100", "--running-sums-size", "50000"],
    "embedding": ["--texts", "200", "--threads", "1"],
    "generation": ["--quick"],
    "fast_decode": ["--quick"],
    "onnx_step": ["--steps", "30"],
    "user_length": ["--requests", "4"],
    "startup": ["--no-generation", "--warm-starts", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=[], metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(ORDER)}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.txt"))
    args = parser.parse_args()
    names = args.names or ORDER
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    failed = []
    with open(out, "w") as log:
        for name in names:
            cmd = [sys.executable, str(HERE / f"{name}.py")] + (QUICK[name] if args.quick else [])
            banner = f"\n$ {' '.join(['python', f'bench/{name}.py'] + cmd[2:])}\n"
            print(banner, flush=True)
            log.write(banner)
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    cwd=HERE.parent)
            for line in proc.stdout:
                if "Loading weights" in line or "deprecated" in line:
                    continue  # progress bars and library deprecation chatter
                print(line, end="", flush=True)
                log.write(line)
            code = proc.wait()
            footer = f"[{name}: exit {code}, {time.perf_counter() - start:.0f} s]\n"
            print(footer, flush=True)
            log.write(footer)
            if code:
                failed.append(name)
    print(f"output saved to {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
