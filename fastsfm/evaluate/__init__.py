"""Evaluation (floor 6): small training sets scored on the real test split.

* :mod:`.evaluator` -- :class:`Evaluator`: probe, classifier inheritance and KD modes, cached
  features, results;
* :mod:`.probe` -- heads trained on augmented views, accuracy, head checkpoints;
* :mod:`.inherit` -- the inherited classifier (projector + real-data classifier) and KD;
* :mod:`.baselines` -- real-image baseline sets (random, centroid, k-means, neighbours);
* :mod:`.export` -- a set as an image folder.

Imports: the foundations, :mod:`fastsfm.data`, :mod:`fastsfm.models`, :mod:`fastsfm.stats`.
"""
