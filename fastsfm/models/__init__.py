"""Backbones (floor 4): frozen pre-trained encoders as the authors compute them.

* :mod:`.backbones` -- the registry, loading, encoding;
* :mod:`.weights` -- weights in their publishers' formats (timm, torch.hub, OpenAI, the MoCo mixin);
* :mod:`.precision` -- autocast, TF32 and attention back ends;
* :mod:`.cast_weights`, :mod:`.cls_only`, :mod:`.hub_positions` -- pre-cast weights, the
  class-token-only last block, DINOv2's per-forward position interpolation;
* :mod:`.ensemble` -- several backbones as one;
* :mod:`.classifier` -- the linear classifier fit on cached features;
* :mod:`.pretrain` -- SSL pre-training of the shipped demo backbones (``fastsfm pretrain``; NT-Xent or a GCA loss).

Imports: the foundations, :mod:`fastsfm.data`.
"""
