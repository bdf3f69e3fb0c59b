"""spinelm: find and label vertebrae in spine MR and CT with a self-configuring nnU-Net pipeline."""
__version__ = "0.1.0"
