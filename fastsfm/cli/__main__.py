"""``python -m fastsfm.cli``: the same command line as ``fastsfm``."""

from .commands import main

main()
