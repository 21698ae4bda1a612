"""A DICOM node that restores low-dose raw mammograms to full-dose quality."""

__version__ = "0.2.0"
