"""`python -m lmdistill.generate [--config FILE] [--section.field value ...]`, the same as `lmdistill generate`."""

from __future__ import annotations

import logging
import sys

from lmdistill.config import load_config
from lmdistill.errors import LmdistillError
from lmdistill.generate.config import GenerateConfig
from lmdistill.generate.run import run_generate


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = None
    if args[:1] == ["--config"] and len(args) > 1:
        path, args = args[1], args[2:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_generate(load_config(GenerateConfig, path, args))
    except LmdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
