"""The FUSE face: a volume's root as an ordinary mounted directory, protocol enforced."""
