"""Data (floor 3): datasets by name, decoding, ImageNet layouts, augmentation, real-image
selections and the set files.

* :mod:`.datasets` -- datasets by name (the digits, ImageFolder trees, ImageNet subsets);
* :mod:`.images` -- decoding, views, loaders' options, fingerprints;
* :mod:`.imagenet` -- ImageNet-1k and its published subsets;
* :mod:`.augment` -- the keyed, differentiable crop + flip + noise of a batch;
* :mod:`.reals` -- real-image selections per class (random, centroid, k-means, neighbours);
* :mod:`.setfile` -- ``synset.safetensors`` files (images, labels, metadata) and their picture.

Imports: the foundations only.
"""
