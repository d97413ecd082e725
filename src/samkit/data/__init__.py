"""Data sets for the experiments: on-disk loaders, subsets, label noise, augmentation."""
