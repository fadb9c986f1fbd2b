"""Distillation (floor 6): the loop and everything one step of it needs.

* :mod:`.loop` -- :func:`distill`: initialise, optimise, checkpoint, resume, export;
* :mod:`.synset` -- the synthetic set (pyramid parameters, storage, chunks);
* :mod:`.optim` -- the chunked Adam; :mod:`.pinned` -- exact-size page-locked host memory;
* :mod:`.checkpoint` -- per-rank checkpoints; :mod:`.metrics` -- the per-step log and its plot;
* :mod:`.objectives` -- SFM, LGM, the two-pass chunked step, the graphed step.

Imports: the foundations, :mod:`fastsfm.loss`, :mod:`fastsfm.data`, :mod:`fastsfm.models`,
:mod:`fastsfm.stats`.
"""
