"""OM-Net + CGA brain tumour segmentation (Zhou et al.), packaged as a BraTS submission container."""

__version__ = "0.1.0"
