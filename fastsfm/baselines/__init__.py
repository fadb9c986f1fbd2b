"""Real-image baselines: selections of real images (random, centroid, k-means, the nearest
neighbors of a set) and the one builder of baseline sets."""
