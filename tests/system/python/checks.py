"""What every client script here shares.

`check(cond, what)` records a failed expectation and goes on, so one run
reports every failure; `run(main, passed)` runs the script's `main`, turns
a crash into a failure with its reason, exits 1 if anything failed, and
otherwise prints `passed` (the line the Rust tests look for).
"""
import sys

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)
    else:
        print("ok:", what.split(":")[0], flush=True)


def run(main, passed):
    try:
        main()
    except Exception as exc:  # a crash is a failure with its reason
        print(f"FAIL: unexpected {type(exc).__name__}: {exc!r}", flush=True)
        sys.exit(1)
    if failures:
        print(f"{len(failures)} failure(s)", flush=True)
        sys.exit(1)
    print(passed, flush=True)
