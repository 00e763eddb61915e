"""segadapt: domain-adaptive and semi-supervised semantic segmentation with class-balanced pseudo labels."""

__version__ = "0.1.0"
