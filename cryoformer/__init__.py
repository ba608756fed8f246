"""cryoformer: continuous heterogeneous cryo-EM reconstruction with a deformation transformer."""

__version__ = "0.1.0"
