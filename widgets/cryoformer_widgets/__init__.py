"""cryoformer-widgets: the interactive layer (Jupyter widgets, napari plugin) over cryoformer.

The widgets themselves arrive with the interactive-layer issue; this distribution already
installs so that set-up scripts and imports are stable.
"""

__version__ = "0.1.0"
