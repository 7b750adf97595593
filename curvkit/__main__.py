"""``python -m curvkit COMMAND ...``: the same as the ``curvkit`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
