"""salt: train GN1/GN2-style jet flavour taggers."""

__version__ = "0.1.0"
