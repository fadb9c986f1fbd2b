"""The command line (floor 7, last): ``fastsfm`` and ``python -m fastsfm.cli``.

* :mod:`.commands` -- :func:`main` and the subcommands (stats, distill, eval, export, reproduce, demo);
* :mod:`.flags` -- flags derived from the typed configs (:mod:`fastsfm.config`);
* :mod:`.demo` -- the offline CPU demo on the shipped digits.

Imports: everything below, :mod:`fastsfm.reproduce` included.
"""
