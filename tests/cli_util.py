import sys

import pytest


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `edgecp ARGS` in-process through main() (the same error handling as the console script)."""
    from edgecp.cli import main

    old = sys.argv
    sys.argv = ["edgecp", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    joined = " ".join(ln.strip() for ln in lines)
    assert joined.startswith("error:"), err
    for n in needles:
        assert n in joined, (n, err)


__all__ = ["run_cli", "assert_one_line_error", "pytest"]
